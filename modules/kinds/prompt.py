"""Kind `prompt`: prompt tuning (Lester et al. 2021), P learned vectors in front of the input.

With `encoder` set, training is P-tuning (v1, Liu et al. 2021, "GPT Understands, Too"): the P
vectors are written by a prompt encoder, an MLP or a bidirectional LSTM followed by an MLP, over P
learned inputs, `prompt = x + encoder(x)` with the encoder's last layer zero at start (so a new
module is exactly the plain prompt it was initialised as). The artifact stores only the folded
vectors: a plain `prompt` artifact, served like any other.

Example::

    m = PromptModule.new(backbone, {"num_virtual_tokens": 16, "init": "labels"},
                         template="Review: {input}\\nSentiment:",
                         labels={"negative": " negative", "positive": " positive"})
    m = PromptModule.new(backbone, {"num_virtual_tokens": 16, "encoder": "lstm"})   # P-tuning
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from modules.core.artifact import ArtifactError
from modules.core.batch import Contribution
from modules.core.module import TaskModule


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(16, ge=1, le=512, description="P, the number of soft-prompt vectors.")
    init: Literal["vocab", "text", "labels"] = Field(
        "vocab", description="Initialise from sampled vocabulary embeddings, from `init_text`, "
                             "or from the label verbalizers' tokens.")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the prompt.")
    encoder: Literal["mlp", "lstm"] | None = Field(
        None, description="Training only: P-tuning's prompt encoder that writes the vectors (folded away in the "
                          "artifact). None = learn the vectors directly.")
    encoder_hidden: int = Field(256, ge=1, le=4096, description="Hidden size of the prompt encoder.")
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
        H = backbone.hidden_size
        self.embeddings = nn.Parameter(torch.zeros(config.num_virtual_tokens, H))  # (P, H): the encoder's input if any
        if config.encoder:
            self.encoder = _Encoder(config.encoder, H, config.encoder_hidden)

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

    def prompt(self) -> torch.Tensor:
        """The P vectors put in front of the input. (P, H)"""
        if not self.config.encoder:
            return self.embeddings
        return self.embeddings + self.encoder(self.embeddings)

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(prepend=self.prompt())

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The folded vectors only (a P-tuning module's encoder is not part of the artifact)."""
        return {"prompt.embeddings": self.prompt().detach().to(device, torch.float32).contiguous()}

    def artifact_config(self) -> dict:
        return self.config.model_copy(update={"encoder": None}).model_dump()

    @classmethod
    def check(cls, manifest, shapes, backbone):
        """An artifact holds the folded vectors: its config has no prompt encoder."""
        if manifest.config.get("encoder") is not None:
            raise ArtifactError("a prompt artifact holds its vectors: encoder must be null (a training-only setting)")
        return super().check(manifest, shapes, backbone)


class _Encoder(nn.Module):
    """P-tuning's prompt encoder: (P, H) -> (P, H); the last layer starts at zero."""

    def __init__(self, style: str, hidden_size: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(hidden_size, hidden // 2 or 1, bidirectional=True, batch_first=True) if style == "lstm" else None
        width = 2 * (hidden // 2 or 1) if self.lstm is not None else hidden_size
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden_size))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]                                          # (P, 2 * (hidden // 2))
        return self.mlp(x)
