"""Building one padded backbone pass from many rows' contributions.

A row is laid out as `[prefix padding | kv prefix | padding | prepended vectors | tokens]`: key/value
prefixes go into a cache prefilled before the pass, the rest is left-padded so every row's last
token sits at the same index. The attention mask hides all padding, and position ids count from
each row's own start, so a row's outputs do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class LinearDelta(Protocol):
    """A per-row change to some of the backbone's linear layers (LoRA and friends).

    `keys` names the layers it touches (e.g. "layers.3.self_attn.q_proj"); calling it with a
    layer's input and output for this module's rows returns the new output for those rows."""

    keys: frozenset[str]

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Contribution:
    """What one module adds to one row of a backbone pass.

    prepend: input embeddings concatenated in front of the row's tokens. (P, H)
    prefix:  per-layer keys and values entering through the cache. 2 x (layers, kv_heads, P, head_dim)
    linear:  a per-row delta on linear layers, applied without touching the shared weights.
    """

    prepend: torch.Tensor | None = None
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    linear: LinearDelta | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.prepend is None else self.prepend.shape[0]

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix[0].shape[2]

    def combine(self, other: "Contribution") -> "Contribution":
        """Both contributions in one (a composed task); each slot may be filled only once."""
        merged = {}
        for name in ("prepend", "prefix", "linear"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None:
                raise ValueError(f"two parts of a composed module both contribute {name!r}")
            merged[name] = mine if mine is not None else theirs
        return Contribution(**merged)


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
    mask: torch.Tensor       # (B, S+L) 1 on real positions (cached prefix and new), 0 on padding
    positions: torch.Tensor  # (B, L) position ids of the new positions
    cache: object | None     # a cache prefilled with kv prefixes, or None
    deltas: list[LinearDelta | None]  # per row


def _prefix_cache(backbone, rows: list[Row]):
    """A cache holding each row's key/value prefix, left-padded to the longest. Returns (cache, mask)."""
    S = max(r.contribution.prefix_length for r in rows)
    i = backbone.info
    B, dev, dt = len(rows), backbone.device, backbone.dtype
    keys = torch.zeros(i.num_layers, B, i.num_kv_heads, S, i.head_dim, device=dev, dtype=dt)  # (N, B, kvh, S, hd)
    values = torch.zeros_like(keys)
    mask = torch.zeros(B, S, device=dev, dtype=torch.long)
    for b, row in enumerate(rows):
        if row.contribution.prefix is None:
            continue
        k, v = row.contribution.prefix                                                # (N, kvh, P, hd)
        P = k.shape[2]
        keys[:, b, :, S - P:] = k.to(dt)
        values[:, b, :, S - P:] = v.to(dt)
        mask[b, S - P:] = 1
    cache = backbone.new_cache()
    for layer in range(i.num_layers):
        cache.update(keys[layer], values[layer], layer)
    return cache, mask


def build_pass(backbone, rows: list[Row]) -> Pass:
    """One left-padded batch for `rows` (mixed modules and lengths)."""
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
    # Tokens after a kv prefix of length P start at position P (as in PEFT's prefix tuning).
    start = torch.tensor([r.contribution.prefix_length for r in rows], device=dev)[:, None]  # (B, 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + start                              # (B, L)
    cache = None
    if any(r.contribution.prefix is not None for r in rows):
        cache, prefix_mask = _prefix_cache(backbone, rows)
        mask = torch.cat([prefix_mask, mask], dim=1)                                    # (B, S+L)
    return Pass(embeds, mask, positions, cache, [r.contribution.linear for r in rows])


def group_rows(deltas: list[LinearDelta | None], device) -> list[tuple[LinearDelta, torch.Tensor | None]]:
    """Rows grouped by delta object: [(delta, row indices or None for "every row")]."""
    groups: dict[int, tuple[LinearDelta, list[int]]] = {}
    for b, d in enumerate(deltas):
        if d is not None:
            groups.setdefault(id(d), (d, []))[1].append(b)
    out = []
    for d, idx in groups.values():
        out.append((d, None if len(idx) == len(deltas) else torch.tensor(idx, device=device)))
    return out


def apply_deltas(groups, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y with each group's delta applied to its rows only (never to the shared weights)."""
    for delta, rows in groups:
        if key not in delta.keys:
            continue
        if rows is None:
            y = delta(key, x, y)
        else:
            y = y.index_copy(0, rows, delta(key, x.index_select(0, rows), y.index_select(0, rows)))
    return y

