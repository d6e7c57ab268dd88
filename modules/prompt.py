"""Kind `prompt`: prompt tuning (Lester et al. 2021), P learned vectors in front of the input.

Example::

    m = PromptModule.new(backbone, {"num_virtual_tokens": 16, "init": "labels"},
                         template="Review: {input}\\nSentiment:",
                         labels={"negative": " negative", "positive": " positive"})
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from modules.base import TaskModule
from modules.batch import Contribution


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="P, the number of soft-prompt vectors.")
    init: Literal["vocab", "text", "labels"] = Field(
        "vocab", description="Initialise from sampled vocabulary embeddings, from `init_text`, "
                             "or from the label verbalizers' tokens.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt.")
    seed: int = 0

    @model_validator(mode="after")
    def _text(self):
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs init_text")
        return self


class PromptModule(TaskModule):
    kind = "prompt"
    Config = PromptConfig

    def __init__(self, manifest, config: PromptConfig, backbone):
        super().__init__(manifest, config, backbone)
        self.embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, backbone.hidden_size))  # (P, H)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        cfg, tok = self.config, backbone.tokenizer
        P, V = cfg.num_virtual_tokens, backbone.info.vocab_size
        g = torch.Generator().manual_seed(cfg.seed)
        ids: list[int] = []
        if cfg.init == "text":
            ids = tok(cfg.init_text, add_special_tokens=False)["input_ids"]
        elif cfg.init == "labels":
            if not self.manifest.labels:
                raise ValueError("init='labels' needs labels in the manifest")
            for verbalizer in self.manifest.labels.values():
                ids += tok(verbalizer, add_special_tokens=False)["input_ids"]
        if ids:
            ids = (ids * (P // len(ids) + 1))[:P]  # repeat (or cut) the text to P tokens
        else:
            ids = torch.randint(min(V, 5000), (P,), generator=g).tolist()  # frequent tokens come first
        table = backbone.model.get_input_embeddings().weight
        self.embeddings.copy_(table[torch.tensor(ids, device=table.device)].float())

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(prepend=self.embeddings)
