"""The running batch of an iteration-level engine: generation rows join and leave at every step.

A step prefills what its token budget allows of the rows waiting to join (long prompts over
several steps), then runs one decode token for every running row:

    join(items) --> waiting --prefill chunks (<= prefill_tokens per step)--> first token --> a slot
    slots --one decode token per step--> a row leaves the step it finishes (EOS, stop, length, cancel)

A chunk after the first runs as a row whose earlier keys/values come in as a key/value prefix
(`modules.core.batch.Contribution.prefix`), exactly as a `prefix` module's do; a prefix-cache hit
(`modules.core.prefix_cache`) starts a row the same way. The n samples of one prompt
(`join_samples`) share its prefill: the prompt's keys/values are computed once, each sample draws
its first token from the same logits with its own generator, and the keys/values are copied into
each sample's slot.

Keys and values of the running rows live in one buffer per layer, `(slots, kv_heads, columns,
head_dim)`. Every decode step writes the next token of every slot at the same column `n`:

    columns:   0 ......................... n-1 | n
    slot 0:    [ row a: prompt + generated    ] | next token of a
    slot 1:    [ masked ....| row b (joined)  ] | next token of b
    slot 2:    [ free (masked, ignored)       ] | -

A row that finishes its prefill is copied into a free slot, right-aligned to end at column `n`,
the columns before it masked. So a join copies only the joining row's keys/values, and a leaving
row only frees its slot: no running row's cache is copied when others join or leave (where HF's
DynamicCache concatenates every row's cache at every step). The buffer is copied only when it
must change shape: more columns (doubling, so amortised), a joining row longer than `n` (room on
the left), or compaction when most slots or leading columns are dead. The price of not copying:
attention reads the masked columns before a late row's start, bounded by that compaction.

Each row keeps its own position ids, mask and linear deltas, so its tokens are those it gets alone
(the left-padding argument of `modules.core.batch`).
"""

from __future__ import annotations

import logging

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from modules.core.batch import DeltaPlan, Row, build_pass
from modules.core.decode import Generated, GenItem, RowError, _RowState, token_logprobs
from modules.core.prefix_cache import PrefixCache, row_kv

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


class _Waiting:
    """A joined prompt part-way through its prefill: `done` ids are in `kv`, 2 x (N, kvh, P, hd).
    `states` are its rows: one, or the n samples that share this prefill."""

    def __init__(self, states: list[_RowState], done: int = 0, kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.states, self.done, self.kv = states, done, kv

    @property
    def item(self) -> GenItem:
        return self.states[0].item

    def row(self, n: int) -> Row:
        """The next chunk of n ids: after the keys/values so far, or (first chunk) with the module's
        own contribution."""
        item = self.item
        if self.kv is None:
            return Row(item.ids[:n], item.contribution)
        return Row(item.ids[self.done:self.done + n], item.contribution.continued(self.kv))


class RunningBatch:
    """Generation rows being decoded, one token per `step`; rows `join` at any step.

    Example::

        batch = RunningBatch(backbone)
        batch.join([GenItem(ids, contribution, Sampling(max_new_tokens=8))])
        while batch:
            for item, generated in batch.step():   # rows that finished at this step
                ...
    """

    def __init__(self, backbone, prefix_cache: PrefixCache | None = None, prefill_tokens: int = 512,
                 slots: int = _MIN_SLOTS, columns: int = _MIN_COLUMNS):
        self.backbone, self.prefix_cache, self.prefill_tokens = backbone, prefix_cache, prefill_tokens
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
        self._waiting: list[_Waiting] = []                                     # joined, prefill not done
        self.first: list[GenItem] = []    # the rows that got their first token in the last step
        self.decoded: list[GenItem] = []  # the rows that got a next token in the last step's decode
        self.prefilled = 0                # positions run through prefill passes so far (virtual tokens too)

    def __len__(self) -> int:
        """Rows joined and not finished (decoding or waiting for their prefill)."""
        return sum(r is not None for r in self.rows) + sum(len(w.states) for w in self._waiting)

    @property
    def tokens(self) -> int:
        """KV columns the rows hold: the live rows' and those of rows part-way through their prefill."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        return (int(self.mask[live].sum()) if live else 0) + sum(w.kv[0].shape[2] for w in self._waiting if w.kv)

    @property
    def waiting(self) -> int:
        """Rows joined but not yet through their prefill."""
        return sum(len(w.states) for w in self._waiting)

    def fits(self, rows: list[tuple[int, int]], budget: int) -> bool:
        """Whether rows of (prompt positions, max new tokens) can join without the key/value buffer
        (slots x columns) passing `budget` tokens before any row leaves: every slot spans the whole
        width, which must hold the longest prompt and then every row's remaining tokens."""
        live = [r for r in self.rows if r is not None]
        if live:
            start = int(self.mask[[s for s, r in enumerate(self.rows) if r is not None]].any(0).nonzero().min())
        span = self.n - start if live else 0
        for w in self._waiting:  # each sample takes a slot of its own
            c = w.item.contribution
            rows = rows + [(c.prefix_length + c.num_virtual_tokens + len(w.item.ids), s.item.sampling.max_new_tokens)
                           for s in w.states]
        width = max([span] + [p for p, _ in rows]) + max([r.item.sampling.max_new_tokens - len(r.ids) for r in live]
                                                      + [m for _, m in rows] + [0]) + 1
        slots = max(_power_of_two(len(live) + len(rows), _MIN_SLOTS), len(self.rows))
        return slots * max(_power_of_two(width, _MIN_COLUMNS), self.mask.shape[1]) <= budget

    # --- joining -------------------------------------------------------------------------------

    def join(self, items: list[GenItem]) -> None:
        """Queue `items` for prefill: the next steps prefill them (in chunks, within the per-step
        budget, starting from any cached prefix); each then takes a free slot with its first token."""
        for it in items:
            self.join_samples([it])

    def join_samples(self, samples: list[GenItem]) -> None:
        """Queue the samples of one prompt (the same ids and contribution; each its own sampling,
        e.g. `Sampling.for_sample(i)`, and callbacks): the prompt is prefilled once, as one row,
        then each sample takes a slot of its own with a copy of its keys/values."""
        first = samples[0]
        if any(s.ids != first.ids or s.contribution is not first.contribution for s in samples):
            raise ValueError("samples of one prompt must share its ids and contribution")
        h, kv = self.prefix_cache.lookup(first.prefix_key, first.ids) if self.prefix_cache else (0, None)
        bb = self.backbone
        self._waiting.append(_Waiting([_RowState(s, bb.tokenizer, bb.eos_token_ids) for s in samples], h, kv))

    def _chunks(self) -> list[tuple["_Waiting", int]]:
        """The waiting rows of this step's prefill, FIFO, and how many ids each gets, within
        `prefill_tokens` (a row's virtual tokens count too; every row taken gets at least one id)."""
        out, budget = [], self.prefill_tokens
        for w in self._waiting:
            if budget <= 0:
                break
            lead = w.item.contribution.num_virtual_tokens if w.kv is None else 0
            n = min(len(w.item.ids) - w.done, max(budget - lead, 1))
            out.append((w, n))
            budget -= lead + n
        return out

    def _prefill(self) -> None:
        """One prefill pass over this step's chunks; a pass that fails runs each row alone."""
        chunks = self._chunks()
        try:
            self._prefill_pass(chunks)
        except Exception as e:  # noqa: BLE001 - only the rows that fail alone fail
            if len(chunks) == 1:
                return self._fail(chunks[0][0], e)
            log.warning("a prefill of %d rows failed (%s: %s); prefilling each row alone", len(chunks), type(e).__name__, e)
            for chunk in chunks:
                try:
                    self._prefill_pass([chunk])
                except Exception as e:  # noqa: BLE001
                    self._fail(chunk[0], e)

    def _fail(self, w: "_Waiting", error: Exception) -> None:
        """A waiting prompt whose prefill failed alone: its rows leave with its error."""
        self._waiting.remove(w)
        for s in w.states:
            s.fail(RowError(f"the task's module failed: {type(error).__name__}: {error}"))
            self._done.append((s.item, _result(s)))

    def _prefill_pass(self, chunks: list[tuple["_Waiting", int]]) -> None:
        bb = self.backbone
        rows = [w.row(n) for w, n in chunks]
        p = build_pass(bb, rows)
        cache = p.cache if p.cache is not None else bb.new_cache()
        hidden = bb.forward(p.embeds, p.mask, p.positions, cache, p.deltas)              # (b, L, H)
        logits = bb.logits(hidden[:, -1])                                                # (b, V)
        self.prefilled += sum(len(r) for r in rows)
        ready = []
        for b, (w, n) in enumerate(chunks):
            w.kv = row_kv(p.mask, cache, b)  # the row's keys/values so far
            w.done += n
            if w.done == len(w.item.ids):
                ready.append((w, b))
        for w, _ in ready:
            self._waiting.remove(w)
            if self.prefix_cache is not None:
                c = w.item.contribution
                self.prefix_cache.insert(w.item.prefix_key, w.item.ids, *w.kv, c.prefix_length + c.num_virtual_tokens)
        if ready:  # every sample of a prompt draws its first token from the prompt's logits
            states = [(w, s) for w, _ in ready for s in w.states]
            _push([s for _, s in states], logits[[b for w, b in ready for _ in w.states]])   # (rows, V)
            self.first += [s.item for _, s in states]
            self._done += [(s.item, _result(s)) for _, s in states if s.finish is not None]
            self._place([(w.kv, s) for w, s in states if s.finish is None])

    def _place(self, rows: list[tuple[tuple[torch.Tensor, torch.Tensor], _RowState]]) -> None:
        """Copy prefilled rows' keys/values into free slots, right-aligned to end at column n (the
        samples of one prompt each get a copy of the same keys/values)."""
        if not rows:
            return
        self._make_room(len(rows), max(kv[0].shape[2] for kv, _ in rows))
        free = [s for s, r in enumerate(self.rows) if r is None][:len(rows)]
        for (kv, state), s in zip(rows, free):
            keys, values = kv
            P = keys.shape[2]
            for layer in range(len(self.keys)):
                self.keys[layer][s, :, self.n - P:self.n] = keys[layer]
                self.values[layer][s, :, self.n - P:self.n] = values[layer]
            self.mask[s] = 0
            self.mask[s, self.n - P:self.n] = 1
            self.pos[s] = P  # a row's positions count its prefix, virtual tokens and ids: the next is P
            self.rows[s] = state
        self._plan = None

    def _make_room(self, rows: int, width: int) -> None:
        """Free slots for `rows` more rows, `width` columns before `n` and one at `n`: copies the live
        rows into a new buffer only when they do not fit, or when most slots or columns are dead."""
        live = [s for s, r in enumerate(self.rows) if r is not None]
        needed, cols = len(live) + rows, self.mask.shape[1]
        if not live and needed <= len(self.rows) and width < cols:  # nothing to keep: reuse the buffer as is
            self.n = width
            self.mask.zero_()
            self.mask[:, max(width - 1, 0)] = 1  # free slots attend one column: finite, ignored
            return
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
        """Prefill what this step's budget allows of the waiting rows, then one decode token for
        every live row; returns the rows that finished in this step (including rows whose first
        token ended them)."""
        self.first, self.decoded = [], []
        if self._waiting:
            self._prefill()
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
        self.decoded = [self.rows[s].item for s in live]
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
        self.decoded = [self.rows[s].item for s in logits]
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
    """Each row's next token from its logits (b, V), and its logprobs when it asked for them (one
    batched log-softmax over those rows); a row with non-finite logits fails alone."""
    finite = torch.isfinite(logits).all(-1).tolist()
    picks = [s.pick(lg) if ok else None for s, lg, ok in zip(states, logits, finite)]
    entries = [None] * len(states)
    want = [b for b, s in enumerate(states) if picks[b] is not None and s.logprobs is not None]
    if want:
        tokenizer = states[want[0]].tokenizer
        got = token_logprobs(tokenizer, logits[want], [picks[b] for b in want],
                             [states[b].item.sampling.logprobs for b in want])
        for b, e in zip(want, got):
            entries[b] = e
    for s, tok, entry in zip(states, picks, entries):
        if tok is None:
            if s.finish is None:  # (a row whose constraint failed in `pick` has its error already)
                s.fail(RowError("the task's module produced non-finite logits"))
        else:
            s.push(tok, entry)


def _result(s: _RowState) -> Generated:
    return Generated(s.ids, s.text, s.finish, s.error, s.logprobs)


def generate(backbone, items: list[GenItem | list[GenItem]]) -> list[Generated | list[Generated]]:
    """Generate for every item together, each row as if it ran alone: all rows join one running
    batch at once and are decoded until the last finishes. A list in `items` is the samples of one
    prompt (`RunningBatch.join_samples`: one prefill); its result is a list too."""
    groups = [it if isinstance(it, list) else [it] for it in items]
    batch = RunningBatch(backbone, prefill_tokens=sum(len(Row(g[0].ids, g[0].contribution)) for g in groups))
    for g in groups:
        batch.join_samples(g)
    done: dict[int, Generated] = {}
    while len(batch):
        done.update((id(it), g) for it, g in batch.step())
    return [[done[id(s)] for s in it] if isinstance(it, list) else done[id(it)] for it in items]
