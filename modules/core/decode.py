"""Scoring over mixed batches of rows, and the per-row state of generation.

`score` returns each label's log-likelihood as a continuation of a row (differentiable, so the
trainer uses it too). A generation row's sampling settings, its next-token choice, its tokens'
log probabilities and its text (streamed as it grows, stop strings, finish reasons) live here;
the decode loop that runs many rows together is `modules.core.running` (`generate`, `RunningBatch`).

Log probabilities follow vLLM's default (`raw_logprobs`): the log-softmax, in float32, of the
model's own logits for the step, before temperature, top-k and top-p. So they do not depend on
the sampling settings, and a token's logprob is the same greedy or sampled, alone or batched.

Structured output: a row whose `Sampling.grammar` is set (a compiled `modules.core.constraint.Grammar`)
gets a `Matcher` of its own (each of n samples too). Its next token is picked from a masked copy of
its logits (the tokens its grammar does not allow get -inf; EOS only when what it wrote so far is a
complete match), and the row finishes with "stop" as soon as the grammar is complete, so its text
always matches, or it ends with "length" (or "error", when its grammar cannot go on: that row only).
Its logprobs are still the model's distribution before the mask, as they are before temperature,
and stop strings do not apply to it (they could cut the JSON short).
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from modules.core.batch import Contribution, Row, build_pass
from modules.core.constraint import ConstraintError, mask_logits


@dataclass
class ScoreItem:
    ids: list[int]
    contribution: Contribution
    continuations: list[list[int]]  # token ids of each label's verbalizer


def score(backbone, items: list[ScoreItem], on_pass=None) -> list[torch.Tensor]:
    """Log-likelihood of each continuation after each item's row: one (K,) tensor per item.

    When every continuation is one token, one row per item is enough (read the next-token
    distribution); otherwise each (row, continuation) pair becomes its own row. `on_pass(mask,
    cache, rows)`, if given, sees the pass's keys/values: `rows[k]` is a pass row that begins
    with item k's row (the prefix cache keeps their leading blocks)."""
    if all(len(c) == 1 for it in items for c in it.continuations):
        p = build_pass(backbone, [Row(it.ids, it.contribution) for it in items])
        hidden = _forward(backbone, p, on_pass, list(range(len(items))))[:, -1]         # (N, H)
        logp = torch.log_softmax(backbone.logits(hidden), dim=-1)                    # (N, V)
        return [logp[n, [c[0] for c in it.continuations]] for n, it in enumerate(items)]

    rows, targets, first = [], [], []
    for it in items:
        first.append(len(rows))
        for cont in it.continuations:
            rows.append(Row(it.ids + cont, it.contribution))
            targets.append(cont)
    p = build_pass(backbone, rows)
    hidden = _forward(backbone, p, on_pass, first)                                   # (R, L, H)
    C = max(len(t) for t in targets)
    # Logits at position j predict token j+1: the last C+1 positions cover every continuation.
    logp = torch.log_softmax(backbone.logits(hidden[:, -C - 1:-1]), dim=-1)          # (R, C, V)
    lls = []
    for r, t in enumerate(targets):
        tok = torch.tensor(t, device=logp.device)
        lls.append(logp[r, C - len(t):].gather(-1, tok[:, None]).sum())
    out, k = [], 0
    for it in items:
        out.append(torch.stack(lls[k:k + len(it.continuations)]))
        k += len(it.continuations)
    return out


def _forward(backbone, p, on_pass, rows: list[int]) -> torch.Tensor:
    """The pass's last hidden states; with `on_pass`, kept keys/values shown to it."""
    if on_pass is None:
        return backbone.forward(p.embeds, p.mask, p.positions, p.cache, p.deltas)
    cache = p.cache if p.cache is not None else backbone.new_cache()
    hidden = backbone.forward(p.embeds, p.mask, p.positions, cache, p.deltas)
    on_pass(p.mask, cache, rows)
    return hidden


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks: equal work per row)
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    # structured output: a compiled modules.core.constraint.Grammar the row's text must match (stop
    # strings then do not apply); each row makes its own Matcher from it
    grammar: object | None = field(default=None, compare=False, repr=False)

    def for_sample(self, i: int) -> "Sampling":
        """The settings of sample i of a prompt: its own seed stream, seed + i (when seeded)."""
        return self if i == 0 or self.seed is None else replace(self, seed=self.seed + i)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its text alone and its bytes (exact even when the token is part of a multi-byte
    character, whose text alone reads U+FFFD), its log probability under the model, and, for a
    generated token, the `Sampling.logprobs` most likely tokens of its step, best first."""

    id: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple["TokenLogprob", ...] = ()


@dataclass
class GenItem:
    ids: list[int]
    contribution: Contribution
    sampling: Sampling
    # called with each new piece of text and the logprobs of the tokens whose text ends in it
    # (streaming; the list is empty unless `sampling.logprobs` is set)
    on_text: Callable[[str, list[TokenLogprob]], None] | None = None
    stop_requested: Callable[[], bool] | None = None  # true once the caller gave up: the row stops
    prefix_key: str | None = None  # the module's content hash: its leading keys/values may be cached


@dataclass
class Generated:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled", or "error"
    error: RowError | None = None  # why this row stopped, when finish_reason is "error"
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when sampling.logprobs is set


class RowError(RuntimeError):
    """One row could not go on (e.g. its module produced non-finite logits); the other rows of its
    batch are unaffected."""


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """One next token for one row from its logits. (V,) -> int

    Sampling is computed as softmax((logits - max) / T) in float64: every scaled logit is <= 0 and
    the best is exactly 0, so no temperature the API accepts (down to the smallest double) can make
    inf or NaN; a tiny T is greedy up to ties, a large one close to uniform. (In float32 a T below
    about 1e-45 rounds to 0 and 0/0 is NaN.)"""
    if s.temperature == 0.0:
        return int(logits.argmax())
    logits = logits.double().cpu()
    logits = (logits - logits.max()) / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= s.top_p  # keep the smallest set reaching top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


class _RowState:
    """Everything one generation row carries through the decode loop: its sampling generator, its
    tokens, their logprobs, its text and how much of it was streamed. The running batch keeps one
    per row (a sample of a prompt is a row of its own) and calls `pick` then `push` for each new
    token; a per-row constraint on the next token (structured output) belongs here too.

    Text is detokenized incrementally (a window from the last stable point, as TGI and vLLM do), so
    a long generation costs O(n), not O(n^2)."""

    def __init__(self, item: GenItem, tokenizer, eos: set[int]):
        self.item, self.tokenizer, self.eos = item, tokenizer, eos
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.logprobs: list[TokenLogprob] | None = None if item.sampling.logprobs is None else []
        self._ends: list[int] = []  # len(text) after each token: a streamed token goes out with its text's end
        self._sent = 0              # logprobs streamed so far
        self.finish: str | None = None
        self.error: RowError | None = None
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the end of `text`
        self.gen = None
        if item.sampling.temperature > 0:
            self.gen = torch.Generator()
            if item.sampling.seed is None:
                self.gen.seed()
            else:
                self.gen.manual_seed(item.sampling.seed)
        self.matcher = item.sampling.grammar.matcher() if item.sampling.grammar is not None else None
        self.stops = [] if self.matcher is not None else item.sampling.stop  # a constrained row has none
        # A stop string may span tokens: hold back that much text while streaming.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def fail(self, error: RowError) -> None:
        self.finish, self.error = "error", error

    def pick(self, logits: torch.Tensor) -> int | None:
        """This row's next token from its logits (V,), by its sampling settings and generator; a
        constrained row's from a masked copy of them. None when the row's grammar cannot go on (the
        row has failed)."""
        if self.matcher is not None:
            logits = logits[None].clone()
            [error] = mask_logits(logits, [self.matcher])
            if error is not None:
                self.fail(RowError(f"structured output failed: {error}"))
                return None
            logits = logits[0]
        return _pick(logits, self.item.sampling, self.gen)

    def _detokenize(self, final: bool) -> None:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):  # a whole character more
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, tok: int, logprob: TokenLogprob | None = None) -> None:
        """Take the next token (and its logprob entry, when the row asked for logprobs)."""
        s = self.item.sampling
        if self.item.stop_requested is not None and self.item.stop_requested():
            self.finish = "cancelled"
            return
        seen = len(self.text)
        if tok in self.eos and (not s.ignore_eos or self.matcher is not None):  # a grammar allows EOS when complete
            self.finish = "stop"
            self._detokenize(final=True)  # a character still incomplete comes out as is
        else:
            self.ids.append(tok)
            complete = False
            if self.matcher is not None and tok not in self.eos:
                try:
                    self.matcher.advance(tok)
                except ConstraintError as e:  # the token does not match (never happens once masked)
                    self.fail(RowError(f"structured output failed: {e}"))
                    return
                complete = self.matcher.is_terminated()
            self._detokenize(final=complete or len(self.ids) >= s.max_new_tokens)
            if self.logprobs is not None:
                self.logprobs.append(logprob)
                self._ends.append(len(self.text))
            if complete:  # the grammar allows nothing more: the row is done, its text matches
                self.finish = "stop"
        for stop in self.stops:  # look where a stop string could have just completed
            at = self.text.find(stop, max(0, seen - len(stop) + 1))
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
        if self.finish is None and len(self.ids) >= s.max_new_tokens:
            self.finish = "length"
        self._stream()

    def _stream(self) -> None:
        if self.item.on_text is None:
            return
        end = len(self.text) if self.finish else len(self.text) - self.holdback
        if not self.finish and self.text.endswith("\ufffd"):  # an incomplete UTF-8 character
            end = min(end, len(self.text) - 1)
        piece, tokens = "", []
        if end > self.emitted:
            piece, self.emitted = self.text[self.emitted:end], end
        if self.logprobs is not None:  # the tokens whose text is all out (every token, at the end)
            upto = len(self.logprobs) if self.finish else bisect_right(self._ends, self.emitted)
            tokens, self._sent = self.logprobs[self._sent:upto], max(self._sent, upto)
        if piece or tokens:
            self.item.on_text(piece, tokens)


_pieces: "weakref.WeakKeyDictionary[object, dict[int, tuple[str, bytes]]]" = weakref.WeakKeyDictionary()
_BYTE_OF: dict[str, int] | None = None  # byte-level BPE's printable stand-in characters -> the bytes


def token_piece(tokenizer, token: int) -> tuple[str, bytes]:
    """A token's own text and its bytes, cached per tokenizer. A byte-level BPE token that holds
    part of a multi-byte character decodes to U+FFFD alone; its bytes come from its stand-in
    characters (GPT-2's byte-to-unicode table) instead. A special token (e.g. `<pad>`) has neither
    text nor bytes, as the generated text leaves it out: a row's tokens joined are its text."""
    global _BYTE_OF
    cache = _pieces.setdefault(tokenizer, {})
    if token in cache:
        return cache[token]
    text = tokenizer.decode([token])
    data = text.encode("utf-8")
    if token in tokenizer.all_special_ids:
        text, data = "", b""  # not in the generated text (decoded with skip_special_tokens); its id says which
    elif "\ufffd" in text:
        if _BYTE_OF is None:
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            _BYTE_OF = {ch: b for b, ch in bytes_to_unicode().items()}
        raw = tokenizer.convert_ids_to_tokens(token)
        if isinstance(raw, str) and raw and all(ch in _BYTE_OF for ch in raw):
            data = bytes(_BYTE_OF[ch] for ch in raw)
    cache[token] = (text, data)
    return text, data


def token_logprobs(tokenizer, logits: torch.Tensor, tokens: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token with its logprob and its row's k most likely tokens. logits (b, V)

    The log-softmax is taken row by row in float32 on the logits as the model gave them (before
    temperature, top-k and top-p), so a row's values do not depend on the other rows."""
    logp = torch.log_softmax(logits.float(), -1)                                      # (b, V)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(ks)
    if k:
        values, order = logp.topk(min(k, logp.shape[-1]), -1)                        # (b, k)
        values, order = values.tolist(), order.tolist()

    def entry(tok: int, lp: float, top=()) -> TokenLogprob:
        return TokenLogprob(tok, *token_piece(tokenizer, tok), lp, top)

    return [entry(t, lp, tuple(entry(o, v) for o, v in zip(order[b][:kb], values[b][:kb])) if kb else ())
            for b, (t, lp, kb) in enumerate(zip(tokens, chosen, ks))]
