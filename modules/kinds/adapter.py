"""Kind `adapter`: bottleneck adapters, serial (Houlsby et al. 2019) or parallel (He et al. 2022).

Each target layer gets a bottleneck `f(h) = up(act(down(h)))` with biases, down (m, in) and up
(out, m) for a bottleneck of size m; up starts at zero, so the module starts as a no-op.

- `houlsby` (serial): on the sublayer's output, `y' = y + s * f(y)`. The default targets o_proj and
  down_proj are the last layers of the attention and MLP blocks, so this is Houlsby's placement:
  after each block, before the residual sum.
- `parallel`: beside the sublayer, reading the sublayer's input, `y' = y + s * f(x_block)`. For
  o_proj the block is the attention (its input is the normed hidden state entering q_proj), for
  down_proj the MLP (the normed hidden state entering up_proj); any other target reads its own
  input. He et al. use s = 4 on the FFN.

The hooks see one linear layer at a time, so a parallel adapter on o_proj or down_proj keeps the
block input it read at q_proj or up_proj (this module's rows, same pass) until the block's last
layer runs in the same pass; the data flow inside a block guarantees that order.

Example::

    m = AdapterModule.new(backbone, {"style": "parallel", "bottleneck": 32, "scale": 4.0,
                                     "targets": ["down_proj"]})
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.batch import Contribution
from modules.core.module import TaskModule
from modules.core.targets import SlotKeys, Target, select_linears, slot

# parallel style: the block's last layer -> the layer whose input is the block's input
BLOCK_INPUT = {"o_proj": "q_proj", "down_proj": "up_proj"}
ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu, "tanh": torch.tanh}


class AdapterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    style: Literal["houlsby", "parallel"] = Field("houlsby", description="houlsby: serial on the sublayer "
                                                  "output; parallel: beside the sublayer, from its input.")
    bottleneck: int = Field(16, ge=1, le=4096, description="m, the bottleneck size.")
    targets: list[Target] = Field(["o_proj", "down_proj"], min_length=1,
                                  description="Layers whose output the adapter adds to, by name.")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scale: float = Field(1.0, description="s, the factor on the adapter's output.")
    seed: int = 0


class AdapterModule(SlotKeys, TaskModule):
    kind = "adapter"
    Config = AdapterConfig

    def __init__(self, manifest, config: AdapterConfig, backbone):
        super().__init__(manifest, config, backbone)
        m = config.bottleneck
        self.down, self.down_bias = nn.ParameterDict(), nn.ParameterDict()
        self.up, self.up_bias = nn.ParameterDict(), nn.ParameterDict()
        self.source: dict[str, str] = {}  # target key -> key whose input the adapter reads (parallel)
        for key, (fan_in, fan_out) in select_linears(backbone, config.targets, config.layers).items():
            width = fan_out
            if config.style == "parallel":
                block, name = key.rsplit(".", 1)
                src = f"{block}.{BLOCK_INPUT[name]}" if name in BLOCK_INPUT else key
                src = src if src in backbone.linear_keys else key
                self.source[key] = src
                width = backbone.linear_keys[src][0]
            s = slot(key)
            self.down[s] = nn.Parameter(torch.zeros(m, width))                   # (m, in)
            self.down_bias[s] = nn.Parameter(torch.zeros(m))
            self.up[s] = nn.Parameter(torch.zeros(fan_out, m))                   # (out, m)
            self.up_bias[s] = nn.Parameter(torch.zeros(fan_out))
        self.delta = _Delta(self)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """down ~ Kaiming-uniform (as LoRA's A), up = 0 and biases 0: a no-op at start."""
        g = torch.Generator().manual_seed(self.config.seed)
        for w in self.down.values():
            bound = 1 / math.sqrt(w.shape[1])
            w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(linear=self.delta)


class _Delta:
    """The adapters for this module's rows (one object per module, so the engine groups rows by it)."""

    def __init__(self, module: AdapterModule):
        self.module = module
        targets = {k.replace("__", ".") for k in module.down}
        # parallel: a block's input is read where it enters (q_proj / up_proj) and kept until the
        # block's last layer, in the same pass and for the same rows
        self.reads = {src: key for key, src in module.source.items() if src != key}
        self.keys = frozenset(targets | set(self.reads))
        self._block_input: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        m = self.module
        if key in self.reads:
            self._block_input[self.reads[key]] = x
        s = slot(key)
        if s not in m.down:
            return y
        if m.config.style == "houlsby":
            h = y
        else:
            h = self._block_input.pop(key) if m.source[key] != key else x
        dt = y.dtype
        z = ACTIVATIONS[m.config.activation](h @ m.down[s].T.to(dt) + m.down_bias[s].to(dt))  # (n, T, m)
        return y + m.config.scale * (z @ m.up[s].T.to(dt) + m.up_bias[s].to(dt))             # (n, T, out)
