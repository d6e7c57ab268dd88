"""The running batch of an iteration-level engine: generation rows join and leave between steps.

Keys and values live in one buffer per layer, `(slots, kv_heads, columns, head_dim)`. Every step
writes the next token of every slot at the same column `n`, so a decode step appends one column:

    columns:   0 ......................... n-1 | n
    slot 0:    [ row a: prompt + generated    ] | next token of a
    slot 1:    [ masked ....| row b (joined)  ] | next token of b
    slot 2:    [ free (masked, ignored)       ] | -

A joining row is prefilled on its own (together with the other rows joining at the same step),
then its keys/values are copied into a free slot, right-aligned to end at column `n`; the columns
before it are masked. So a join copies only the joining rows' cache, and a leaving row only frees
its slot: no running row's cache is copied when others join or leave. The buffer is copied only
when it must change shape: more columns (doubling, so amortised), a joining row longer than `n`
(room on the left), or compaction when most slots or leading columns are dead. Attention still
reads the columns before a late row's start (masked): that is the price of not copying, bounded
by compaction.

Each row keeps its own position ids, mask and linear deltas, so its tokens are those it gets alone
(the same left-padding argument as `modules.batch`).
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from modules.batch import Contribution, DeltaPlan, Row, build_pass
from modules.decode import Generated, GenItem, RowError, _pick, _RowState
from modules.prefix_cache import PrefixCache

log = logging.getLogger("frozenlm.running")


_MIN_SLOTS, _MIN_COLUMNS = 8, 64


def _power_of_two(n: int, least: int) -> int:
    out = least
    while out < n:
        out *= 2
    return out


class _SlotLayer(DynamicLayer):
    """One layer's keys/values in slots; `update` writes the new columns at `cache.n`."""

    def __init__(self, cache: "_SlotCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.cache, self.keys, self.values = cache, keys, values
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        n, T, hi = self.cache.n, key_states.shape[2], self.cache.hi
        self.keys[:hi, :, n:n + T] = key_states
        self.values[:hi, :, n:n + T] = value_states
        return self.keys[:hi, :, :n + T], self.values[:hi, :, :n + T]

    def get_seq_length(self) -> int:
        return self.cache.n


class _SlotCache(DynamicCache):
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], n: int):
        super().__init__()
        self.n, self.hi = n, keys[0].shape[0]
        self.layers = [_SlotLayer(self, k, v) for k, v in zip(keys, values)]


class RunningBatch:
    """Generation rows being decoded, one token per `step`; rows `join` at any step.

    Example::

        batch = RunningBatch(backbone)
        batch.join([GenItem(ids, contribution, Sampling(max_new_tokens=8))])
        while batch:
            for item, generated in batch.step():   # rows that finished at this step
                ...
    """

    def __init__(self, backbone, slots: int = _MIN_SLOTS, columns: int = _MIN_COLUMNS,
                 prefix_cache: PrefixCache | None = None):
        self.backbone, self.prefix_cache = backbone, prefix_cache
        i = backbone.info
        dev, dt = backbone.device, backbone.dtype
        shape = (slots, i.num_kv_heads, columns, i.head_dim)
        self.keys = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(i.num_layers)]
        self.values = [torch.zeros(shape, device=dev, dtype=dt) for _ in range(i.num_layers)]
        self.mask = torch.zeros(slots, columns, device=dev, dtype=torch.long)  # 1 on each slot's real columns
        self.pos = torch.zeros(slots, device=dev, dtype=torch.long)            # each slot's next position id
        self.rows: list[_RowState | None] = [None] * slots                     # None = a free slot
        self.n = 0                                                             # the next column to write
        self._plan: DeltaPlan | None = None
        self._done: list[tuple[GenItem, Generated]] = []

    def __len__(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def tokens(self) -> int:
        """KV columns the live rows hold (what a KV budget counts)."""
        return int(self.mask[[s for s, r in enumerate(self.rows) if r is not None]].sum()) if len(self) else 0

    # --- joining -------------------------------------------------------------------------------

    @torch.inference_mode()
    def join(self, items: list[GenItem]) -> None:
        """Prefill `items` together and give each its first token; those that go on take free slots."""
        bb = self.backbone
        states = [_RowState(it, bb.tokenizer, bb.eos_token_ids) for it in items]
        p = build_pass(bb, [self._cached(it) for it in items])
        cache = p.cache if p.cache is not None else bb.new_cache()
        hidden = bb.forward(p.embeds, p.mask, p.positions, cache, p.deltas)              # (b, L, H)
        logits = bb.logits(hidden[:, -1])                                                # (b, V)
        self._remember(items, p.mask, cache)
        _push(states, logits)
        going = [b for b, s in enumerate(states) if s.finish is None]
        self._done += [(s.item, _result(s)) for s in states if s.finish is not None]
        if not going:
            return
        width = p.mask.shape[1]                                                          # S+L columns
        self._make_room(len(going), width)
        free = [s for s, r in enumerate(self.rows) if r is None][:len(going)]
        idx = torch.tensor(going, device=p.mask.device)
        dst = torch.tensor(free, device=p.mask.device)
        for layer in range(bb.info.num_layers):
            k, v = cache.layers[layer].keys, cache.layers[layer].values                  # (b, kvh, S+L, hd)
            self.keys[layer][dst, :, self.n - width:self.n] = k.index_select(0, idx).to(self.keys[layer].dtype)
            self.values[layer][dst, :, self.n - width:self.n] = v.index_select(0, idx).to(self.values[layer].dtype)
        self.mask[dst] = 0
        self.mask[dst, self.n - width:self.n] = p.mask.index_select(0, idx)
        self.pos[dst] = p.positions.index_select(0, idx)[:, -1] + 1
        for b, s in zip(going, free):
            self.rows[s] = states[b]
        self._plan = None

    def _cached(self, item: GenItem) -> Row:
        """The row to prefill: its leading keys/values from the prefix cache where they are there."""
        h, kv = self.prefix_cache.lookup(item.prefix_key, item.ids) if self.prefix_cache else (0, None)
        if kv is None:
            return Row(item.ids, item.contribution)
        return Row(item.ids[h:], Contribution(prefix=kv, linear=item.contribution.linear))

    def _remember(self, items: list[GenItem], mask: torch.Tensor, cache) -> None:
        """Put the prefilled rows' leading blocks in the prefix cache (each row's real columns, in order)."""
        if self.prefix_cache is None:
            return
        for b, it in enumerate(items):
            if it.prefix_key is None:
                continue
            cols = mask[b].nonzero().squeeze(1)
            keys = torch.stack([layer.keys[b][:, cols] for layer in cache.layers])          # (N, kvh, P+V+T, hd)
            values = torch.stack([layer.values[b][:, cols] for layer in cache.layers])
            c = it.contribution
            self.prefix_cache.insert(it.prefix_key, it.ids, keys, values, c.prefix_length + c.num_virtual_tokens)

    def _make_room(self, rows: int, width: int) -> None:
        """Free slots for `rows` more rows, `width` columns before `n` and one at `n`: copies the live
        rows into a new buffer only when they do not fit, or when most slots or columns are dead."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        needed, cols = len(live) + rows, self.mask.shape[1]
        start = int(self.mask[live].any(0).nonzero().min()) if live else self.n  # the first column in use
        fits = needed <= len(self.rows) and width <= self.n and self.n < cols
        wasteful = (len(self.rows) > _MIN_SLOTS and 4 * needed <= len(self.rows)) or start > cols // 2
        if fits and not wasteful:
            return
        n = max(width, self.n - start)  # the new write column
        self._reshape(live, start, _power_of_two(needed, _MIN_SLOTS), _power_of_two(n + 1, _MIN_COLUMNS), n)

    def _reshape(self, live: list[int], start: int, slots: int, cols: int, n: int) -> None:
        """Copy the live rows into a new buffer of `slots` x `cols`, their columns ending at `n`."""
        used = self.n - start
        idx = torch.tensor(live, device=self.mask.device, dtype=torch.long)
        i = self.backbone.info
        for layer in range(i.num_layers):
            for buf in (self.keys, self.values):
                new = buf[layer].new_zeros(slots, i.num_kv_heads, cols, i.head_dim)
                new[:len(live), :, n - used:n] = buf[layer][idx, :, start:self.n]
                buf[layer] = new
        mask = self.mask.new_zeros(slots, cols)
        mask[:len(live), n - used:n] = self.mask[idx, start:self.n]
        pos = self.pos.new_zeros(slots)
        pos[:len(live)] = self.pos[idx]
        self.mask, self.pos, self.n = mask, pos, n
        self.rows = [self.rows[s] for s in live] + [None] * (slots - len(live))
        self._plan = None

    # --- stepping ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[GenItem, Generated]]:
        """One decode token for every live row; returns the rows that finished since the last step
        (including those that finished on their first token when they joined)."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        if live:
            self._make_room(0, 0)
            live = [s for s, r in enumerate(self.rows) if r is not None]
            self._decode(live)
        done, self._done = self._done, []
        return done

    def _decode(self, live: list[int]) -> None:
        bb, hi = self.backbone, live[-1] + 1
        dev = self.mask.device
        last = torch.tensor([[r.ids[-1] if r is not None else 0] for r in self.rows[:hi]], device=dev)  # (hi, 1)
        self.mask[:hi, self.n] = 1
        if self._plan is None:
            self._plan = DeltaPlan([r.item.contribution.linear if r is not None else None for r in self.rows[:hi]], dev)
        cache = _SlotCache([k[:hi] for k in self.keys], [v[:hi] for v in self.values], self.n)
        try:
            hidden = bb.forward(bb.embed(last), self.mask[:hi, :self.n + 1], self.pos[:hi, None], cache,
                                self._plan)                                                 # (hi, 1, H)
        except Exception as e:  # noqa: BLE001 - a row's module failed: find it by stepping each row alone
            log.warning("a decode step of %d rows failed (%s: %s); stepping each row alone", len(live), type(e).__name__, e)
            return self._decode_alone(live)
        logits = bb.logits(hidden[:, -1])                                                  # (hi, V)
        self.n += 1
        self.pos[:hi] += 1
        _push([self.rows[s] for s in live], logits[live])
        self._release(live)

    def _decode_alone(self, live: list[int]) -> None:
        """The batched step failed: fail only the rows whose step fails alone. (Slow path.)"""
        bb, dev = self.backbone, self.mask.device
        logits = {}
        for s in live:
            row = self.rows[s]
            cache = _SlotCache([k[s:s + 1] for k in self.keys], [v[s:s + 1] for v in self.values], self.n)
            cache.hi = 1
            plan = DeltaPlan([row.item.contribution.linear], dev)
            try:
                hidden = bb.forward(bb.embed(torch.tensor([[row.ids[-1]]], device=dev)),
                                    self.mask[s:s + 1, :self.n + 1], self.pos[s:s + 1, None], cache, plan)
                logits[s] = bb.logits(hidden[:, -1])[0]
            except Exception as e:  # noqa: BLE001
                row.fail(RowError(f"the task's module failed: {type(e).__name__}: {e}"))
        self.n += 1
        self.pos += 1
        for s, lg in logits.items():
            _push([self.rows[s]], lg[None])
        self._release(live)

    def _release(self, live: list[int]) -> None:
        """Rows that finished give back their slots (their columns stay, masked by nobody's use)."""
        for s in live:
            r = self.rows[s]
            if r.finish is not None:
                self._done.append((r.item, _result(r)))
                self.rows[s] = None
                self.mask[s] = 0
                self.mask[s, self.n - 1] = 1  # a free slot attends to one column: finite, ignored
                self._plan = None


def _push(states: list[_RowState], logits: torch.Tensor) -> None:
    """Each row's next token from its logits (b, V); a row with non-finite logits fails alone."""
    finite = torch.isfinite(logits).all(-1).tolist()
    for s, lg, ok in zip(states, logits, finite):
        if not ok:
            s.fail(RowError("the task's module produced non-finite logits"))
        else:
            s.push(_pick(lg, s.item.sampling, s.gen))


def _result(s: _RowState) -> Generated:
    return Generated(s.ids, s.text, s.finish, s.error)
