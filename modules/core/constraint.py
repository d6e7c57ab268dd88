"""Structured output: a per-row grammar that masks the tokens a row may generate next.

A constraint is a JSON schema, a regular expression, or "any JSON object". It is compiled once per
backbone (an LRU keyed by its type and canonical JSON), then each constrained row gets its own
`Matcher`, which says which tokens may come next and follows the row's tokens:

    grammars = grammars_for(backbone)
    m = grammars.compile(Constraint.json_schema({"type": "object", ...})).matcher()   # ConstraintError if it cannot
    errors = mask_logits(logits, [m, None, ...])  # (rows, V) in place: only the constrained rows' logits change
    m.advance(token)                               # the row's chosen token
    m.is_terminated()                              # the grammar is complete and allows nothing more: the row stops

The engine is llguidance (an Earley parser over a lazily built lexer, from the Guidance project):
it reads the transformers tokenizer as is, computes one row's mask in tens of microseconds on the
embedded backbone's 49,152-token vocabulary, compiles a JSON schema in milliseconds, and names what
it cannot compile (`Unimplemented keys: ["uniqueItems"]`) rather than ignoring it, so what the row
writes validates against the schema it was given.

EOS: the mask allows the backbone's end-of-sequence tokens exactly when the grammar accepts what the
row wrote so far; once the grammar can take nothing more (`is_terminated`), only EOS is allowed and
the row should finish. Tokens the model's head has beyond the tokenizer's vocabulary are never
allowed in a constrained row.

A hostile constraint cannot stall the server: the spec's size is capped, llguidance's own limits
(lexer fuel, grammar size, lexer states) bound its work, and a compile (which includes the first
mask, where most of the lexer is built) that runs past `compile_timeout_s` is abandoned with a
ConstraintError (it finishes in a worker thread, bounded by those limits, and its result is cached).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch

TYPES = ("json_schema", "regex", "json_object")  # as OpenAI's response_format names them

# The JSON llguidance writes: json.dumps's separators and no other whitespace. Free whitespace lets
# a small model write newlines or spaces for ever; a schema may still ask for it with
# {"x-guidance": {"whitespace_flexible": true}}.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}

MAX_SPEC_BYTES = 64 * 1024
COMPILE_TIMEOUT_S = 5.0
CACHE_SIZE = 64
_ERROR_CHARS = 400


class ConstraintError(ValueError):
    """A constraint that is invalid, too large, or that the grammar engine cannot compile or follow.
    The message names the problem (an API answers it as a 422)."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """What a row's output must match: type "json_schema" (spec: the schema, a dict), "regex" (spec:
    the pattern, matched in full, Rust `regex` syntax) or "json_object" (any JSON object; no spec)."""

    type: str
    spec: Any = None

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        return cls("json_schema", schema)

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @property
    def key(self) -> str:
        """The cache key: the type and the spec's canonical JSON. Canonical means compact, not
        key-sorted: a schema's property order is the order the output writes them in."""
        if self.type not in TYPES:
            raise ConstraintError(f"unknown constraint type {self.type!r}; known: {', '.join(TYPES)}")
        if self.type == "json_schema" and not isinstance(self.spec, dict):
            raise ConstraintError(f"json_schema must be a JSON object, got {type(self.spec).__name__}")
        if self.type == "regex" and (not isinstance(self.spec, str) or not self.spec):
            raise ConstraintError("regex must be a non-empty string")
        if self.type == "json_object" and self.spec is not None:
            raise ConstraintError("json_object takes no spec")
        try:
            text = json.dumps(self.spec, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except RecursionError:
            raise ConstraintError(f"the {self.type} is nested too deeply") from None
        except (TypeError, ValueError) as e:
            raise ConstraintError(f"the {self.type} is not JSON: {e}") from None
        return f"{self.type}:{text}"


def _engine_message(error: str) -> str:
    """llguidance's error on one line, without the parser state it may dump; a regex parse error
    as `invalid regex "(ab": unclosed group`."""
    text = error.split("<state>")[0]
    bad = re.search(r"regex parse error:\s*\n\s*([^\n]*)\n.*?^error: ([^\n]*)", text, re.S | re.M)
    if bad:
        text = f"invalid regex {json.dumps(bad.group(1))}: {bad.group(2)}"
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + "..."


class Matcher:
    """One row's position in its grammar: the tokens allowed next, and the tokens taken so far."""

    def __init__(self, inner: llguidance.LLMatcher, vocab_size: int):
        self._m, self.vocab_size = inner, vocab_size  # vocab_size: the tokenizer's, as the grammar sees it

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into one int32 row of a CPU bitmask, `((vocab_size + 31) // 32,)`:
        bit `t % 32` of word `t // 32` is set when token t is allowed."""
        if bitmask_row.dtype != torch.int32 or not bitmask_row.is_cpu or not bitmask_row.is_contiguous() \
                or bitmask_row.numel() != _words(self.vocab_size):
            raise ValueError(f"a bitmask row is a contiguous CPU int32 tensor of {_words(self.vocab_size)} words")
        self._m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        self._check()

    def allowed(self, vocab_size: int | None = None) -> torch.Tensor:
        """The allowed next tokens as a bool tensor of `vocab_size` (the model's logits width;
        tokens past the tokenizer's vocabulary are never allowed). Raises ConstraintError if the
        grammar cannot go on."""
        bits = torch.empty(1, _words(self.vocab_size), dtype=torch.int32)
        self.fill(bits[0])
        return _widen(unpack(bits, self.vocab_size), vocab_size or self.vocab_size)[0]

    def advance(self, token_id: int) -> None:
        """Take the row's next token. A token the grammar does not allow raises ConstraintError (the
        matcher is then unusable)."""
        if not self._m.consume_token(int(token_id)):
            raise ConstraintError(f"token {token_id} does not match the grammar: {_engine_message(self._m.get_error())}")

    def is_accepting(self) -> bool:
        """What the row wrote so far is a complete match (EOS is allowed now)."""
        return self._m.is_accepting()

    def is_terminated(self) -> bool:
        """Nothing but EOS can follow (the match is complete and cannot grow, or EOS was taken): the
        row is done."""
        return self._m.is_stopped()

    def fork(self) -> "Matcher":
        """An independent copy at the same position (for n samples of one prompt)."""
        return Matcher(self._m.deep_copy(), self.vocab_size)

    copy = fork

    @property
    def error(self) -> str | None:
        return _engine_message(self._m.get_error()) if self._m.is_error() else None

    def _check(self) -> None:
        if self._m.is_error():
            raise ConstraintError(f"the grammar cannot go on: {self.error}")


class Grammar:
    """A compiled constraint; `matcher()` starts a row at its beginning. Thread-safe."""

    def __init__(self, constraint: Constraint, template: llguidance.LLMatcher, vocab_size: int):
        self.constraint, self._template, self.vocab_size = constraint, template, vocab_size
        self._lock = threading.Lock()

    def matcher(self) -> Matcher:
        with self._lock:
            return Matcher(self._template.deep_copy(), self.vocab_size)


class Grammars:
    """Compiles constraints for one tokenizer, with an LRU of compiled grammars (and of failures, so
    a rejected spec sent again is rejected at once).

    `eos_ids`: the tokens that end a row (the backbone's); `limits`: llguidance's parser limits."""

    def __init__(self, tokenizer, eos_ids: Sequence[int] | None = None, *, cache_size: int = CACHE_SIZE,
                 max_spec_bytes: int = MAX_SPEC_BYTES, compile_timeout_s: float = COMPILE_TIMEOUT_S,
                 limits: llguidance.LLParserLimits | None = None):
        self._hf_tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids) if eos_ids else None  # None: the tokenizer's own
        self.cache_size, self.max_spec_bytes, self.compile_timeout_s = cache_size, max_spec_bytes, compile_timeout_s
        self.limits = limits or llguidance.LLParserLimits(verbose_errors=False)
        self._tok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Grammar | ConstraintError] = OrderedDict()
        self._inflight: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frozenlm-grammar")

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the tokenizer (built once: about 0.3 s for a 49k vocabulary)."""
        with self._lock:
            if self._tok is None:
                try:
                    self._tok = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=self.eos_ids)
                except ValueError as e:  # e.g. a slow (Python) tokenizer
                    raise ConstraintError(f"structured output needs a fast tokenizer: {e}") from None
            return self._tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def compile(self, constraint: Constraint) -> Grammar:
        """The compiled grammar of `constraint`, from the cache when it is there. Raises
        ConstraintError (naming the problem) for an invalid, too large, unsupported or too slow one."""
        key = constraint.key  # validates the type and spec
        size = len(key.encode()) - len(constraint.type) - 1
        if size > self.max_spec_bytes:
            raise ConstraintError(f"the {constraint.type} is {size} bytes as JSON; the limit is {self.max_spec_bytes}")
        tok = self.tokenizer  # outside the timed part
        started = False
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            else:
                fut = self._inflight.get(key)
                if fut is None:
                    fut = self._inflight[key] = self._pool.submit(self._build, constraint, tok)
                    started = True
        if started:  # outside the lock: a future already done runs its callback here, at once
            fut.add_done_callback(lambda f, key=key: self._store(key, f))
        if hit is None:
            try:
                hit = fut.result(timeout=self.compile_timeout_s)
            except FutureTimeout:
                raise ConstraintError(f"the {constraint.type} took longer than {self.compile_timeout_s:g} s "
                                      f"to compile") from None
        if isinstance(hit, ConstraintError):
            raise ConstraintError(str(hit))
        return hit

    def _store(self, key: str, fut: Future) -> None:
        with self._lock:
            self._inflight.pop(key, None)
            if fut.cancelled() or fut.exception() is not None:
                return  # an unexpected failure: not cached, the next compile tries again
            self._cache[key] = fut.result()
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _build(self, c: Constraint, tok: llguidance.LLTokenizer) -> Grammar | ConstraintError:
        """Compile in a worker thread; a spec the engine rejects comes back as a ConstraintError."""
        try:
            if c.type == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(c.spec)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    c.spec if c.type == "json_schema" else ANY_OBJECT, defaults=JSON_OPTIONS)
            m = llguidance.LLMatcher(tok, grammar, log_level=0, limits=self.limits)
            if not m.is_error():  # the first mask builds the lexer's first states: a blow-up shows here
                bits = torch.empty(_words(tok.vocab_size), dtype=torch.int32)
                m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - ValueError for a bad spec; a Rust panic is a BaseException
            return ConstraintError(f"the {c.type} cannot be compiled: {_engine_message(str(e))}")
        if m.is_error():
            return ConstraintError(f"the {c.type} cannot be compiled: {_engine_message(m.get_error())}")
        return Grammar(c, m, tok.vocab_size)

    def matcher(self, constraint: Constraint) -> Matcher:
        return self.compile(constraint).matcher()


_GRAMMARS: "weakref.WeakKeyDictionary[Any, Grammars]" = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def grammars_for(backbone) -> Grammars:
    """The backbone's Grammars (one per backbone, made on first use)."""
    with _GRAMMARS_LOCK:
        g = _GRAMMARS.get(backbone)
        if g is None:
            g = _GRAMMARS[backbone] = Grammars(backbone.tokenizer, sorted(backbone.eos_token_ids))
        return g


# --- masks over a batch ----------------------------------------------------------------------------

def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, words) int32 bitmask -> (rows, vocab_size) bool, on the bitmask's device."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # an arithmetic shift: & 1 keeps only the bit asked for
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _widen(allowed: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, n) -> (rows, width): cut, or padded with False (tokens the grammar cannot know)."""
    n = allowed.shape[1]
    if width <= n:
        return allowed[:, :width]
    return torch.cat([allowed, allowed.new_zeros(allowed.shape[0], width - n)], 1)


_EXECUTOR: llguidance.LLExecutor | None = None


def fill_bitmask(matchers: Sequence[Matcher], parallel: bool = False
                 ) -> tuple[torch.Tensor, list[ConstraintError | None]]:
    """The masks of `matchers` (which share one tokenizer), (len, words) int32 on the CPU, and each
    row's error (None when it can go on). One after the other in this thread, or with `parallel`
    in llguidance's thread pool (slower for 8 rows on a busy 2-core machine: bench/constraint.py)."""
    global _EXECUTOR
    n = matchers[0].vocab_size
    if any(m.vocab_size != n for m in matchers):
        raise ValueError("the matchers of one batch must share a tokenizer")
    bits = torch.empty(len(matchers), _words(n), dtype=torch.int32)
    if not parallel:
        for i, m in enumerate(matchers):
            m._m.unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.shape[1] * 4)
    else:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                          bits.shape[1] * 4, len(matchers))
    errors = [ConstraintError(f"the grammar cannot go on: {m.error}") if m.error else None for m in matchers]
    return bits, errors


def mask_logits(logits: torch.Tensor, matchers: Sequence[Matcher | None], parallel: bool = False
                ) -> list[ConstraintError | None]:
    """Mask, in place, the logits (rows, V) of the rows that have a matcher (`matchers[r]`, None for a
    free row, whose logits stay as they are): a token the row's grammar does not allow gets -inf,
    as does every token past the tokenizer's vocabulary when V is larger (a padded head).

    Returns each row's error, None when it can go on: a row whose grammar failed (llguidance's
    per-step limits), or whose allowed tokens all lie past V, must not pick a token from its logits.
    Check the logits for non-finite values before masking, not after (masked ones are -inf)."""
    rows = [r for r, m in enumerate(matchers) if m is not None]
    errors: list[ConstraintError | None] = [None] * len(matchers)
    if not rows:
        return errors
    if logits.dim() != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits must be (rows, V) with one row per matcher, got {tuple(logits.shape)}")
    bits, errs = fill_bitmask([matchers[r] for r in rows], parallel)
    empty = apply_bitmask(logits, rows, bits, matchers[rows[0]].vocab_size)
    for i, r in enumerate(rows):
        errors[r] = errs[i] or (ConstraintError("the grammar allows no token the model can produce") if empty[i] else None)
    return errors


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def apply_bitmask(logits: torch.Tensor, rows: Sequence[int], bits: torch.Tensor, vocab_size: int) -> list[bool]:
    """The masking half of `mask_logits`: `bits[i]` (a CPU bitmask over the tokenizer's `vocab_size`)
    masks `logits[rows[i]]` in place. Returns, per row, whether nothing is left allowed.

    CPU logits are masked with numpy, in this thread: torch's intra-op threads would each wait for
    the others on every small op, which costs far more than the work on a busy machine. Other
    devices get the bitmask copied over and unpacked there."""
    V = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES and not logits.requires_grad:
        k = min(vocab_size, V)
        banned = np.unpackbits(np.invert(bits.numpy()).view(np.uint8), axis=1, count=vocab_size,
                               bitorder="little").view(bool)                                     # (len(rows), n)
        out, empty = logits.numpy(), []
        for i, r in enumerate(rows):
            np.copyto(out[r, :k], -np.inf, where=banned[i, :k])
            out[r, k:] = -np.inf
            empty.append(bool(banned[i, :k].all()))
        return empty
    allowed = _widen(unpack(bits.to(logits.device, non_blocking=True), vocab_size), V)       # (len(rows), V)
    idx = torch.tensor(rows, device=logits.device)
    logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill_(~allowed, float("-inf")))
    return (~allowed.any(-1)).tolist()
