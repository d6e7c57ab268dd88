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
    layer's input and output for this module's rows returns the new output for those rows. A
    low-rank delta may also offer `low_rank(key) -> (A (r, in), B (out, r), scale)`, which lets
    many modules share one pair of matmuls per layer (see DeltaPlan)."""

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

    def continued(self, kv: tuple[torch.Tensor, torch.Tensor]) -> "Contribution":
        """This contribution for the rest of a row whose leading positions (this contribution's
        prefix and prepended vectors included) are already computed as keys/values `kv`
        (a prefix-cache hit, or the next chunk of a chunked prefill): they enter as a key/value
        prefix, and the linear delta still applies to the rest."""
        return Contribution(prefix=kv, linear=self.linear)

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
    deltas: "DeltaPlan"      # the rows' linear deltas


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
    return Pass(embeds, mask, positions, cache, DeltaPlan([r.contribution.linear for r in rows], dev))


class DeltaPlan:
    """The per-row linear deltas of one batch, prepared once and reused by every decode step.

    For each hooked layer, the low-rank deltas present (LoRA) are concatenated into one
    down-projection `A_cat` (in, G*r) and one up-projection `B_cat` (G*r, out) with each module's
    scale folded in; a 0/1 mask (B, 1, G*r) keeps each row's own slice. So a layer costs two
    matmuls and one multiply whatever the number of modules in the batch, never a loop over rows:

        y = y + ((x @ A_cat) * mask) @ B_cat          # (B,T,in) -> (B,T,G*r) -> (B,T,out)

    Rows without a delta have an all-zero mask and get exactly `y`. Deltas that are not low-rank
    are applied per module on its rows (index_select / index_copy)."""

    def __init__(self, deltas: list[LinearDelta | None], device):
        self.deltas, self.device = deltas, device
        self.modules: list[LinearDelta] = []
        for d in deltas:
            if d is not None and all(d is not m for m in self.modules):
                self.modules.append(d)
        self._layers: dict[str, tuple | None] = {}  # key -> prepared weights, shared by selections
        self._masks: dict[str, torch.Tensor] = {}   # key -> (B, 1, G*r) for these rows

    def __bool__(self) -> bool:
        return bool(self.modules)

    def select(self, rows: list[int]) -> "DeltaPlan":
        """The plan for a subset of the rows (rows finish during decoding)."""
        plan = DeltaPlan.__new__(DeltaPlan)
        plan.deltas, plan.device, plan.modules = [self.deltas[r] for r in rows], self.device, self.modules
        plan._layers = self._layers
        idx = torch.tensor(rows, device=self.device)
        plan._masks = {k: m.index_select(0, idx) for k, m in self._masks.items()}
        return plan

    def _prepare(self, key: str):
        mods = [m for m in self.modules if key in m.keys]
        if not mods:
            return None
        low = [m.low_rank(key) for m in mods] if all(hasattr(m, "low_rank") for m in mods) else None
        if low is None:
            return ("each", mods)
        if len(mods) == 1 and all(d is mods[0] for d in self.deltas):  # every row, one module
            a, b, s = low[0]
            return ("one", a.T, b.T * s)                                               # (in, r), (r, out)
        a_cat = torch.cat([a.T for a, _, _ in low], dim=1)                              # (in, G*r)
        b_cat = torch.cat([b.T * s for _, b, s in low], dim=0)                          # (G*r, out)
        return ("cat", a_cat, b_cat, mods, [a.shape[0] for a, _, _ in low])

    def _mask(self, key: str, mods, ranks) -> torch.Tensor:
        if key not in self._masks:
            cols = torch.zeros(len(self.deltas), 1, sum(ranks), device=self.device)
            start = 0
            for m, r in zip(mods, ranks):
                for b, d in enumerate(self.deltas):
                    if d is m:
                        cols[b, 0, start:start + r] = 1
                start += r
            self._masks[key] = cols
        return self._masks[key]

    def apply(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y with each row's delta for layer `key` (never touching the shared weights)."""
        if key not in self._layers:
            self._layers[key] = self._prepare(key)
        prep = self._layers[key]
        if prep is None:
            return y
        if prep[0] == "one":
            return y + (x @ prep[1].to(x.dtype)) @ prep[2].to(x.dtype)
        if prep[0] == "cat":
            _, a_cat, b_cat, mods, ranks = prep
            h = (x @ a_cat.to(x.dtype)) * self._mask(key, mods, ranks).to(x.dtype)     # (B, T, G*r)
            return y + h @ b_cat.to(x.dtype)                                            # (B, T, out)
        for m in prep[1]:
            rows = [b for b, d in enumerate(self.deltas) if d is m]
            if not rows:  # every row of this module has finished (a selection while decoding)
                continue
            rows = torch.tensor(rows, device=self.device)
            y = y.index_copy(0, rows, m(key, x.index_select(0, rows), y.index_select(0, rows)))
        return y
