"""Kind `bitfit`: learned bias deltas on chosen linear layers (BitFit, Ben Zaken et al. 2022).

BitFit trains only the backbone's biases. The Llama family has no biases in its linear layers, so
here each chosen layer gets a learned bias delta b (out,) added to its output for this module's
rows only: `y' = W x + b`. The shared weights stay untouched; b starts at zero (a no-op).

Example::

    m = BitFitModule.new(backbone, {"targets": ["q_proj", "up_proj"], "layers": [0, 1]})
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.module import TaskModule
from modules.core.targets import TARGETS, ChangesLinears, ModuleDelta, SlotKeys, Target, select_linears, slot


class BitFitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(list(TARGETS), min_length=1,
                                  description="Linear layers that get a learned bias, by name (q_proj, k_proj, "
                                              "v_proj, o_proj, gate_proj, up_proj, down_proj).")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all.")


class BitFitModule(ChangesLinears, SlotKeys, TaskModule):
    kind = "bitfit"
    Config = BitFitConfig

    def __init__(self, manifest, config: BitFitConfig, backbone):
        super().__init__(manifest, config, backbone)
        self.bias = nn.ParameterDict({slot(key): nn.Parameter(torch.zeros(fan_out))           # (out,)
                                      for key, (_, fan_out) in select_linears(backbone, config.targets,
                                                                              config.layers).items()})
        self.delta = ModuleDelta(self, (k.replace("__", ".") for k in self.bias))

    def change(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias[slot(key)].to(y.dtype)                          # (n, T, out) + (out,)
