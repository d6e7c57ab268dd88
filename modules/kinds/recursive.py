"""Kind `recursive`: run the frozen backbone twice (Levine et al. 2022, "LM recursion").

Neural recursion (mode "neural"): pass 1 reads `[pass-1 prompt | input]`; the final hidden states
of the input positions go through a small trained connector (an MLP, or one transformer layer)
that maps them into the embedding space; pass 2 reads `[pass-2 prompt | connector output]`
(feed "replace") or `[pass-2 prompt | connector output | input]` (feed "prepend") and answers.
The connector should first be pre-trained on language modelling text (pass 1 reads a text's
beginning, pass 2 must continue it): `frozenlm train --kind recursive --lm-text FILE`, then
trained on the task from that artifact (`--init`).

Textual recursion (mode "textual"): pass 1 samples `candidates` short answers; pass 2 reads
`[pass-2 prompt | "Candidate answers: a | b | c" | input]`.

Pass 1 is a probe (modules.core.stages): the first passes of every recursive row in a batch run
together (with other kinds' probes); pass 2 joins the main batch with every other kind.

Example::

    m = RecursiveModule.new(backbone, {"mode": "neural", "connector": "mlp", "pass2_prompt_tokens": 8})
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.batch import Contribution, Row
from modules.core.decode import Sampling
from modules.core.module import TaskModule
from modules.core.stages import NO_CONTEXT, Context, Probe


class RecursiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["neural", "textual"] = "neural"
    pass1_prompt_tokens: int = Field(0, ge=0, le=512, description="Soft prompt of pass 1 (0 = none).")
    pass2_prompt_tokens: int = Field(8, ge=0, le=512, description="Soft prompt of pass 2 (0 = none).")
    connector: Literal["mlp", "transformer"] = Field("mlp", description="Neural mode: the connector network.")
    connector_dim: int = Field(256, ge=8, le=2048, description="Neural mode: the connector's inner width.")
    feed: Literal["replace", "prepend"] = Field(
        "replace", description="Neural mode: pass 2 reads the connector output alone, or in front of the input.")
    candidates: int = Field(3, ge=1, le=16, description="Textual mode: answers sampled in pass 1.")
    candidate_tokens: int = Field(8, ge=1, le=64, description="Textual mode: longest candidate, in tokens.")
    temperature: float = Field(0.7, ge=0.0, description="Textual mode: sampling temperature of pass 1.")
    network_lr_scale: float = Field(0.1, gt=0, description="Training: the network's learning rate relative to "
                                                           "the prompt vectors'.")
    seed: int = Field(0, ge=0, le=2**62, description="Seeds initialisation, and textual mode's sampling.")


class RecursiveModule(TaskModule):
    kind = "recursive"
    vectors = ("prompt1", "prompt2")
    Config = RecursiveConfig

    def __init__(self, manifest, config: RecursiveConfig, backbone):
        super().__init__(manifest, config, backbone)
        H, D = backbone.hidden_size, config.connector_dim
        self.depth = backbone.info.num_layers
        self.prompt1 = nn.Parameter(torch.zeros(config.pass1_prompt_tokens, H))   # (P1, H)
        self.prompt2 = nn.Parameter(torch.zeros(config.pass2_prompt_tokens, H))   # (P2, H)
        if config.mode == "neural":
            self.connector = nn.ModuleDict({"norm": nn.LayerNorm(H), "down": nn.Linear(H, D), "up": nn.Linear(D, H)})
            if config.connector == "transformer":
                self.connector["block"] = nn.TransformerEncoderLayer(
                    D, nhead=max(1, D // 64), dim_feedforward=2 * D, dropout=0.0, batch_first=True, norm_first=True)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """Prompts from sampled vocabulary embeddings; the connector's output scaled to the
        embedding table's (so pass 2 starts with inputs of a familiar size)."""
        g = torch.Generator().manual_seed(self.config.seed)
        table = backbone.model.get_input_embeddings().weight
        V = min(backbone.info.vocab_size, 5000)
        for p in (self.prompt1, self.prompt2):
            p.copy_(table[torch.randint(V, (p.shape[0],), generator=g).to(table.device)].float())
        if self.config.mode == "neural":
            torch.manual_seed(self.config.seed)
            for name in ("down", "up"):
                lin = self.connector[name]
                bound = 1 / math.sqrt(lin.in_features)
                lin.weight.copy_(torch.rand(lin.weight.shape, generator=g) * 2 * bound - bound)
                lin.bias.zero_()
            self.connector["up"].weight.mul_(float(table.float().std()) * math.sqrt(self.config.connector_dim))

    def pass_length(self, n: int) -> int:
        c = self.config
        first = n + c.pass1_prompt_tokens
        if c.mode == "textual":
            return max(first, n + c.pass2_prompt_tokens + c.candidates * (c.candidate_tokens + 2) + 8)
        return max(first, c.pass2_prompt_tokens + n + (n if c.feed == "prepend" else 0))

    def probe_tokens(self, n: int) -> int:
        """Pass 1 over [P1 | input]; textual mode samples `candidates` continuations of it."""
        c = self.config
        first = n + c.pass1_prompt_tokens
        return c.candidates * (first + c.candidate_tokens) if c.mode == "textual" else first

    def probe(self, ids: list[int], context: Context = NO_CONTEXT) -> Probe:
        row = Row(ids, Contribution(prepend=self.prompt1 if self.config.pass1_prompt_tokens else None))
        if self.config.mode == "textual":
            c = self.config
            return Probe([row], sampling=Sampling(max_new_tokens=c.candidate_tokens, temperature=c.temperature,
                                                seed=c.seed, stop=["\n"]), n=c.candidates)
        return Probe([row], depth=self.depth)

    def connect(self, states: torch.Tensor) -> torch.Tensor:
        """Pass-1 final hidden states of the input -> pass-2 input embeddings. (T, H) -> (T, H)"""
        c = self.connector
        h = c["down"](c["norm"](states.to(self.prompt2.dtype)))                        # (T, D)
        if "block" in c:
            h = c["block"](h[None])[0]
        else:
            h = torch.nn.functional.gelu(h)
        return c["up"](h)                                                               # (T, H)

    def finish(self, ids: list[int], results: list, state=None) -> tuple[list[int], Contribution]:
        c, result = self.config, results[0]
        if c.mode == "textual":
            answers = " | ".join(t.strip() for t in result)
            ids = self.tokenizer(f"Candidate answers: {answers}\n", add_special_tokens=False)["input_ids"] + ids
            return ids, Contribution(prepend=self.prompt2 if c.pass2_prompt_tokens else None)
        embedded = self.connect(result[c.pass1_prompt_tokens:])                        # (T, H)
        prepend = torch.cat([self.prompt2, embedded.to(self.prompt2.dtype)])            # (P2+T, H)
        return (ids if c.feed == "prepend" else []), Contribution(prepend=prepend)
