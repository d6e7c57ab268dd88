"""Kind `ia3`: (IA)^3, learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

Keys and values are rescaled on the output of k_proj and v_proj, `k' = l_k * (W_k x)`; the FFN is
rescaled on its inner activation, i.e. the input of down_proj: `y' = W_down (l_ff * x)`, applied
as `y + W_down (x * (l_ff - 1))` with the backbone's own (shared, frozen) down_proj weight, so the
delta needs nothing but this row's x and y. All vectors start at one: the module is a no-op.
Which targets scale their input instead of their output is PEFT's `feedforward_modules`.

Example::

    m = IA3Module.new(backbone, {"targets": ["k_proj", "v_proj", "down_proj"]})
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from modules.core.module import TaskModule
from modules.core.targets import ChangesLinears, ModuleDelta, SlotKeys, Target, select_linears, slot


class IA3Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(["k_proj", "v_proj", "down_proj"], min_length=1,
                                  description="Linear layers to rescale, by name.")
    feedforward: list[Target] = Field(["down_proj"],
                                      description="Targets rescaled on their input (the FFN activation) "
                                                  "rather than their output; must be among `targets`.")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all.")

    @model_validator(mode="after")
    def _subset(self):
        if not set(self.feedforward) <= set(self.targets):
            raise ValueError(f"feedforward {self.feedforward} must be among targets {self.targets}")
        return self


class IA3Module(ChangesLinears, SlotKeys, TaskModule):
    kind = "ia3"
    Config = IA3Config

    def __init__(self, manifest, config: IA3Config, backbone):
        super().__init__(manifest, config, backbone)
        self.l = nn.ParameterDict()
        # Input-scaled layers need the layer's weight; a plain dict, so it is neither saved nor
        # moved or cast with the module (it is the backbone's own tensor, never written).
        self.weights: dict[str, torch.Tensor] = {}
        for key, (fan_in, fan_out) in select_linears(backbone, config.targets, config.layers).items():
            if key.rsplit(".", 1)[-1] in config.feedforward:
                self.l[slot(key)] = nn.Parameter(torch.ones(fan_in))                            # (in,)
                self.weights[key] = backbone.model.base_model.get_submodule(key).weight         # (out, in)
            else:
                self.l[slot(key)] = nn.Parameter(torch.ones(fan_out))                           # (out,)
        self.delta = ModuleDelta(self, (k.replace("__", ".") for k in self.l))

    def change(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        l = self.l[slot(key)].to(y.dtype)
        w = self.weights.get(key)
        if w is None:
            return y * l                                                    # (n, T, out) * (out,)
        return y + (x * (l - 1)) @ w.T.to(x.dtype)                         # (n, T, in) @ (in, out)
