"""Kind `compose`: one task made of several primitives, e.g. LoRA + a soft prompt.

The manifest lists the parts; each part keeps its own tensor keys (`lora.*`, `prompt.*`), and
the task's contribution is the parts' contributions together (each slot filled once).

Example::

    m = ComposeModule.new(backbone, {"parts": [{"kind": "lora", "config": {"r": 4}},
                                               {"kind": "prompt", "config": {"num_virtual_tokens": 8}}]})
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from modules.core.batch import Contribution
from modules.core.module import TaskModule
from modules.registry import kind_class


class Part(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="A primitive kind: prompt, prefix or lora.")
    config: dict[str, Any] = Field(default_factory=dict)


class ComposeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parts: list[Part] = Field(min_length=2, description="The primitives, each kind at most once.")

    @field_validator("parts")
    @classmethod
    def _distinct(cls, parts: list[Part]) -> list[Part]:
        kinds = [p.kind for p in parts]
        if len(set(kinds)) != len(kinds) or "compose" in kinds:
            raise ValueError(f"parts must be distinct primitive kinds, got {kinds}")
        return parts


class ComposeModule(TaskModule):
    kind = "compose"
    Config = ComposeConfig

    def __init__(self, manifest, config: ComposeConfig, backbone):
        super().__init__(manifest, config, backbone)
        parts = []
        for part in config.parts:
            cls = kind_class(part.kind)
            if cls.probe is not TaskModule.probe:
                raise ValueError(f"kind {part.kind} probes the input and cannot be a part of compose")
            cfg = cls.Config(**part.config)
            parts.append(cls(manifest.model_copy(update={"kind": part.kind, "config": cfg.model_dump()}), cfg, backbone))
        self.parts = nn.ModuleList(parts)

    def initialize(self, backbone) -> None:
        for part in self.parts:
            part.initialize(backbone)

    @property
    def num_virtual_tokens(self) -> int:
        return sum(p.num_virtual_tokens for p in self.parts)

    def contribution(self, ids: list[int]) -> Contribution:
        out = Contribution()
        for part in self.parts:
            out = out.combine(part.contribution(ids))
        return out

    def artifact_config(self) -> dict:
        return {"parts": [{"kind": p.kind, "config": p.artifact_config()} for p in self.parts]}

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        return {k: v for part in self.parts for k, v in part.tensors(device).items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for part in self.parts:
            part.load_tensors({k: v for k, v in tensors.items() if k.startswith(f"{part.kind}.")})
