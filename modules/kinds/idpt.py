"""Kind `idpt`: an input-dependent prompt generator (Levine et al. 2022, "Standing on the Shoulders
of Giant Frozen Language Models", ID-PT).

Instead of one fixed soft prompt, a small network reads the input and writes a prompt for it:

1. encoder: the backbone's own first `encoder_layers` layers (frozen, so no second model is
   loaded) run over `[encoder prompt (E learned vectors) | input tokens]`;
2. generator: P learned queries cross-attend over the encoder states (LayerNorm, then multi-head
   attention in a `attention_dim`-wide space) and write P vectors in the embedding space:
   `prompt = queries + W_o . attention(W_q queries, W_k h, W_v h)`;
3. the P vectors are prepended to the input of the frozen backbone, like a soft prompt.

`W_o` starts at zero, so a new module is exactly a soft prompt (its queries) and training can only
add input dependence. The encoder pass is a probe (modules.core.stages): the encoder passes of every
idpt row in a batch run together, then the rows join the main pass with every other kind.

Example::

    m = IDPTModule.new(backbone, {"num_virtual_tokens": 16, "encoder_layers": 6})
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.batch import Contribution, Row
from modules.core.module import TaskModule
from modules.core.stages import NO_CONTEXT, Context, Probe


class IDPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="P, the generated prompt's length.")
    encoder_layers: int = Field(0, ge=0, le=256, description="Depth of the frozen encoder (the backbone's first k "
                                                      "layers); 0 = a fifth of the backbone's layers.")
    encoder_prompt_tokens: int = Field(8, ge=0, le=512, description="E, the encoder's own learned prompt.")
    attention_dim: int = Field(128, ge=8, le=2048, description="Width of the cross-attention.")
    heads: int = Field(4, ge=1, le=64, description="Attention heads (attention_dim must divide by it).")
    network_lr_scale: float = Field(0.1, gt=0, description="Training: the network's learning rate relative to "
                                                           "the prompt vectors'.")
    seed: int = 0


class IDPTModule(TaskModule):
    kind = "idpt"
    vectors = ("queries", "encoder_prompt")
    Config = IDPTConfig

    def __init__(self, manifest, config: IDPTConfig, backbone):
        super().__init__(manifest, config, backbone)
        if config.attention_dim % config.heads:
            raise ValueError(f"attention_dim {config.attention_dim} does not divide by heads {config.heads}")
        n = backbone.info.num_layers
        self.depth = config.encoder_layers or max(1, n // 5)
        if self.depth > n:
            raise ValueError(f"encoder_layers {self.depth} is more than the backbone's {n} layers")
        H, D, P = backbone.hidden_size, config.attention_dim, config.num_virtual_tokens
        self.queries = nn.Parameter(torch.zeros(P, H))                        # (P, H)
        self.encoder_prompt = nn.Parameter(torch.zeros(config.encoder_prompt_tokens, H))  # (E, H)
        self.norm = nn.LayerNorm(H)
        self.q = nn.Linear(H, D, bias=False)
        self.k = nn.Linear(H, D, bias=False)
        self.v = nn.Linear(H, D, bias=False)
        self.o = nn.Linear(D, H, bias=False)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """Queries and encoder prompt from sampled vocabulary embeddings; W_o = 0."""
        g = torch.Generator().manual_seed(self.config.seed)
        table = backbone.model.get_input_embeddings().weight
        V = min(backbone.info.vocab_size, 5000)  # frequent tokens come first
        for p in (self.queries, self.encoder_prompt):
            ids = torch.randint(V, (p.shape[0],), generator=g)
            p.copy_(table[ids.to(table.device)].float())
        for lin in (self.q, self.k, self.v):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
        self.o.weight.zero_()

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def pass_length(self, n: int) -> int:
        return n + max(self.config.num_virtual_tokens, self.config.encoder_prompt_tokens)

    def probe_tokens(self, n: int) -> int:
        """The encoder pass: [E | input] (counted as if it ran every layer)."""
        return n + self.config.encoder_prompt_tokens

    def probe(self, ids: list[int], context: Context = NO_CONTEXT) -> Probe:
        prompt = self.encoder_prompt if self.config.encoder_prompt_tokens else None
        return Probe([Row(ids, Contribution(prepend=prompt))], depth=self.depth)

    def generate_prompt(self, states: torch.Tensor) -> torch.Tensor:
        """The prompt for one input from its encoder states. (T, H) -> (P, H)"""
        h = self.norm(states.to(self.queries.dtype))
        heads, P = self.config.heads, self.queries.shape[0]
        q = self.q(self.queries).view(P, heads, -1).transpose(0, 1)              # (heads, P, d)
        k = self.k(h).view(h.shape[0], heads, -1).transpose(0, 1)                 # (heads, T, d)
        v = self.v(h).view(h.shape[0], heads, -1).transpose(0, 1)                 # (heads, T, d)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)          # (heads, P, d)
        return self.queries + self.o(att.transpose(0, 1).reshape(P, -1))          # (P, H)

    def finish(self, ids: list[int], results: list[torch.Tensor], state=None) -> tuple[list[int], Contribution]:
        return ids, Contribution(prepend=self.generate_prompt(results[0]))
