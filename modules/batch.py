"""Building one padded backbone pass from many rows' contributions.

Rows are left-padded so every row's last token sits at the same index; the attention mask hides
the padding and position ids restart at 0 at each row's first real position, so a row's outputs do
not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Contribution:
    """What one module adds to one row of a backbone pass.

    prepend: input embeddings concatenated in front of the row's token embeddings. (P, H)
    """

    prepend: torch.Tensor | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prepend is None else self.prepend.shape[0]


@dataclass
class Row:
    """One sequence in a pass: token ids plus its module's contribution."""

    ids: list[int]
    contribution: Contribution = field(default_factory=Contribution)

    def __len__(self) -> int:
        return self.contribution.num_virtual_tokens + len(self.ids)


@dataclass
class Pass:
    embeds: torch.Tensor     # (B, L, H) left-padded input embeddings
    mask: torch.Tensor       # (B, L) 1 on real positions, 0 on padding
    positions: torch.Tensor  # (B, L) position ids, 0 at each row's first real position


def build_pass(backbone, rows: list[Row]) -> Pass:
    """One left-padded batch of input embeddings for `rows` (mixed modules and lengths)."""
    L = max(len(r) for r in rows)
    H, dev = backbone.hidden_size, backbone.device
    embeds = torch.zeros(len(rows), L, H, device=dev, dtype=backbone.dtype)
    mask = torch.zeros(len(rows), L, device=dev, dtype=torch.long)
    for b, row in enumerate(rows):
        parts = []
        if row.contribution.prepend is not None:
            parts.append(row.contribution.prepend.to(backbone.dtype))                   # (P, H)
        if row.ids:
            parts.append(backbone.embed(torch.tensor(row.ids, device=dev)))             # (T, H)
        e = torch.cat(parts) if len(parts) > 1 else parts[0]                            # (P+T, H)
        embeds[b, L - e.shape[0]:] = e
        mask[b, L - e.shape[0]:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                                      # (B, L)
    return Pass(embeds, mask, positions)
