"""Kind `lora`: low-rank deltas `y = W x + s * B(A x)` applied per row, never merged.

`s` is `alpha / r` (or `alpha / sqrt(r)` with rsLoRA). The shared weights stay untouched: the
backbone's linear layers call this module's delta only for the rows of a batch that use it, so
rows of many LoRA modules (any ranks and targets) and rows with none share one pass.

Example::

    m = LoRAModule.new(backbone, {"targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16})
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.batch import Contribution
from modules.core.module import TaskModule
from modules.core.targets import Target, pattern_values, select_linears, slot

MAX_RANK = 256


class LoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(["q_proj", "v_proj"], min_length=1,
                                  description="Linear layers to adapt, by name (q_proj, k_proj, v_proj, o_proj, "
                                              "gate_proj, up_proj, down_proj).")
    r: int = Field(8, ge=1, le=MAX_RANK, description="Rank.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: s = alpha / r (alpha / sqrt(r) with rslora).")
    rslora: bool = False
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all.")
    rank_pattern: dict[str, Annotated[int, Field(ge=1, le=MAX_RANK)]] = Field(
        default_factory=dict, description="Per-layer rank overrides: regex over the layer key -> r "
                                          "(see modules.core.targets.pattern_values).")
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Per-layer alpha overrides: regex over the layer key -> alpha.")
    seed: int = 0


class LoRAModule(TaskModule):
    kind = "lora"
    Config = LoRAConfig

    def __init__(self, manifest, config: LoRAConfig, backbone):
        super().__init__(manifest, config, backbone)
        keys = select_linears(backbone, config.targets, config.layers)
        ranks = pattern_values(config.rank_pattern, keys, config.r)
        alphas = pattern_values(config.alpha_pattern, keys, config.alpha)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        self.scale: dict[str, float] = {}
        for key, (fan_in, fan_out) in keys.items():
            r, alpha = ranks[key], alphas[key]
            self.A[slot(key)] = nn.Parameter(torch.zeros(r, fan_in))     # (r, in)
            self.B[slot(key)] = nn.Parameter(torch.zeros(fan_out, r))    # (out, r)
            self.scale[key] = alpha / (math.sqrt(r) if config.rslora else r)
        self.delta = _Delta(self)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """A ~ Kaiming-uniform, B = 0 (as in the LoRA paper and PEFT): the module starts as a no-op."""
        g = torch.Generator().manual_seed(self.config.seed)
        for a in self.A.values():
            bound = 1 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(linear=self.delta)

    def state_dict(self, *args, **kwargs):  # tensor keys: A.<layer key>, B.<layer key>
        sd = super().state_dict(*args, **kwargs)
        return {k.replace("__", "."): v for k, v in sd.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict({k[:2] + slot(k[2:]): v for k, v in state_dict.items()}, strict, assign)


class _Delta:
    """The module's LinearDelta: one object per module, so the engine groups rows by it."""

    def __init__(self, module: LoRAModule):
        self.module = module
        self.keys = frozenset(module.scale)

    def low_rank(self, key: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        s = slot(key)
        return self.module.A[s], self.module.B[s], self.module.scale[key]

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b, s = self.low_rank(key)
        return y + (x @ a.T.to(x.dtype)) @ b.T.to(x.dtype) * s            # (n, T, in) -> (n, T, r) -> (n, T, out)
