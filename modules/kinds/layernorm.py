"""Kind `layernorm`: LayerNorm tuning, learned deltas of the backbone's normalization weights
(the "part-parameter tuning" of the delta-tuning survey; Zhao et al. 2023, "Tuning LayerNorm in
Attention").

A normalization layer computes `y = w * n(x)` (+ b for a LayerNorm), n the RMS (or mean and
variance) normalization. This module learns Δw per chosen layer and gives its rows
`y' = (w + Δw) * n(x) = y + Δw * n(x)`, recomputing n(x) from the layer's input; the shared weights
stay untouched, and Δw starts at zero (a no-op). The layers are those the backbone hooks:
each decoder layer's `input_layernorm` and `post_attention_layernorm`, and the final `norm`.

Example::

    m = LayerNormModule.new(backbone, {"targets": ["input_layernorm", "post_attention_layernorm"]})
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.module import TaskModule
from modules.core.targets import ChangesLinears, ModuleDelta, SlotKeys, select_norms, slot

NormTarget = Literal["input_layernorm", "post_attention_layernorm", "norm"]


class LayerNormConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[NormTarget] = Field(["input_layernorm", "post_attention_layernorm", "norm"], min_length=1,
                                      description="Normalization layers whose weights get a learned delta, by "
                                                  "name: each decoder layer's input_layernorm and "
                                                  "post_attention_layernorm, and the final norm.")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all (the final norm "
                                                       "is not in a layer and is kept whenever it is a target).")


class LayerNormModule(ChangesLinears, SlotKeys, TaskModule):
    kind = "layernorm"
    Config = LayerNormConfig

    def __init__(self, manifest, config: LayerNormConfig, backbone):
        super().__init__(manifest, config, backbone)
        self.norms = select_norms(backbone, config.targets, config.layers)
        self.scale = nn.ParameterDict({slot(key): nn.Parameter(torch.zeros(info.size))   # (H,)
                                       for key, info in self.norms.items()})
        self.delta = ModuleDelta(self, self.norms)

    def change(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dw = self.scale[slot(key)].to(y.dtype)                              # (H,)
        return y + dw * self.norms[key].normalized(x)                       # (n, T, H)
