"""Kind `prefix`: prefix tuning / P-tuning v2, learned keys and values in front of every layer.

The prefix enters through a prefilled cache, so the backbone attends to it like to earlier tokens;
tokens start at position P (as PEFT does). With `reparam_hidden` set, training learns P vectors
and an MLP that writes the keys and values (Li & Liang 2021); the artifact stores only the folded
keys and values.

Example::

    m = PrefixModule.new(backbone, {"num_virtual_tokens": 10, "reparam_hidden": 256})
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.artifact import ArtifactError
from modules.core.batch import Contribution
from modules.core.module import TaskModule


class PrefixConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_virtual_tokens: int = Field(10, ge=1, le=512, description="P, the prefix length in every layer.")
    reparam_hidden: int | None = Field(None, ge=1, le=4096,
                                       description="Training only: hidden size of the MLP that writes the "
                                                   "prefix (folded away in the artifact). None = learn it directly.")
    seed: int = 0


class PrefixModule(TaskModule):
    kind = "prefix"
    Config = PrefixConfig

    def __init__(self, manifest, config: PrefixConfig, backbone):
        super().__init__(manifest, config, backbone)
        i, P = backbone.info, config.num_virtual_tokens
        self.shape = (i.num_layers, i.num_kv_heads, P, i.head_dim)
        if config.reparam_hidden:
            width = 2 * i.num_layers * i.num_kv_heads * i.head_dim
            self.embedding = nn.Parameter(torch.zeros(P, i.hidden_size))                # (P, H)
            self.mlp = nn.Sequential(nn.Linear(i.hidden_size, config.reparam_hidden), nn.Tanh(),
                                     nn.Linear(config.reparam_hidden, width))
        else:
            self.keys = nn.Parameter(torch.zeros(self.shape))                             # (N, kvh, P, hd)
            self.values = nn.Parameter(torch.zeros(self.shape))

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """Start from the keys and values the backbone itself computes for random vocabulary tokens."""
        P = self.config.num_virtual_tokens
        g = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(min(5000, backbone.info.vocab_size), (1, P), generator=g).to(backbone.device)
        if self.config.reparam_hidden:
            self.embedding.copy_(backbone.embed(ids)[0].float())
            return
        cache = backbone.new_cache()
        ones = torch.ones(1, P, dtype=torch.long, device=backbone.device)
        backbone.forward(backbone.embed(ids), ones, torch.arange(P, device=backbone.device)[None], cache)
        for layer in range(self.shape[0]):
            self.keys[layer] = cache.layers[layer].keys[0].float()                       # (kvh, P, hd)
            self.values[layer] = cache.layers[layer].values[0].float()

    @classmethod
    def check(cls, manifest, shapes, backbone):
        """An artifact holds the folded keys and values: its config has no reparameterization."""
        if manifest.config.get("reparam_hidden") is not None:
            raise ArtifactError("a prefix artifact holds its keys and values: reparam_hidden must be null "
                                "(it is a training-only setting)")
        return super().check(manifest, shapes, backbone)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values. 2 x (N, kvh, P, hd)"""
        if not self.config.reparam_hidden:
            return self.keys, self.values
        N, kvh, P, hd = self.shape
        out = self.mlp(self.embedding).view(P, 2 * N, kvh, hd).permute(1, 2, 0, 3)     # (2N, kvh, P, hd)
        return out[0::2], out[1::2]                                                     # layer l: (2l, 2l+1)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(prefix=self.kv())

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        keys, values = self.kv()
        return {"prefix.keys": keys.detach().to(device, torch.float32).contiguous(),
                "prefix.values": values.detach().to(device, torch.float32).contiguous()}

    def artifact_config(self) -> dict:
        """The artifact holds the folded keys and values only (no reparameterization MLP)."""
        return self.config.model_copy(update={"reparam_hidden": None}).model_dump()
