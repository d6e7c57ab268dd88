"""Structured output's grammar layer (modules.core.constraint): masks, EOS, per-row masking in a
shared batch, and what a bad or hostile constraint gets. Decoding runs through the real model
(the tiny one, and the embedded backbone in the integration tests) with a small loop here, since
`modules.core.running` does not take a mask yet."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import Future
from types import SimpleNamespace

import jsonschema
import llguidance
import pytest
import regex
import torch

from modules.core.constraint import Constraint, ConstraintError, Grammars, apply_bitmask, grammars_for, mask_logits

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "member": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 2}},
    "required": ["name", "age", "member"], "additionalProperties": False}
PHONE = r"(\+1 )?[0-9]{3}-[0-9]{4}"
# Both are bounded: every path through them ends within ~100 bytes, so a row always finishes.
BOUNDED = [Constraint.json_schema(PERSON), Constraint.regex(PHONE)]


def tok_id(bb, text: str) -> int:
    ids = bb.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1
    return ids[0]


def allowed_ids(m, vocab=None) -> list[int]:
    return m.allowed(vocab).nonzero().flatten().tolist()


def check(constraint: Constraint, text: str) -> None:
    """The text matches the constraint (raises otherwise)."""
    if constraint.type == "regex":
        assert re.fullmatch(constraint.spec, text), text
        return
    value = json.loads(text)
    if constraint.type == "json_schema":
        jsonschema.validate(value, constraint.spec)
    else:
        assert isinstance(value, dict), text


@torch.inference_mode()
def decode(bb, prompt: list[int], constraints: list[Constraint | None], max_new: int, temperature: float = 0.0,
           seed: int = 0) -> list[tuple[list[int], str]]:
    """One prompt, one row per constraint (None: a free row), decoded together: masks applied to the
    batch's logits, greedy or sampled. Returns each row's (tokens, finish reason: "stop" or "length")."""
    g = grammars_for(bb)
    matchers = [g.matcher(c) if c is not None else None for c in constraints]
    rows, T, eos = len(constraints), len(prompt), bb.eos_token_ids
    cache, gen = bb.new_cache(), torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt] * rows)
    hidden = bb.forward(bb.embed(ids), torch.ones(rows, T, dtype=torch.long),
                        torch.arange(T).expand(rows, T), cache)
    out: list[list[int]] = [[] for _ in constraints]
    finish: list[str | None] = [None] * rows
    for step in range(max_new):
        logits = bb.logits(hidden[:, -1])
        assert torch.isfinite(logits).all()
        live = [m if finish[r] is None else None for r, m in enumerate(matchers)]
        assert mask_logits(logits, live) == [None] * rows
        if temperature:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen)[:, 0].tolist()
        else:
            nxt = logits.argmax(-1).tolist()
        for r, t in enumerate(nxt):
            if finish[r] is not None:
                continue
            if matchers[r] is not None:
                matchers[r].advance(t)
            if t in eos:
                finish[r] = "stop"
                continue
            out[r].append(t)
            if matchers[r] is not None and matchers[r].is_terminated():
                finish[r] = "stop"
        if all(finish):
            break
        hidden = bb.forward(bb.embed(torch.tensor(nxt)[:, None]), torch.ones(rows, T + step + 1, dtype=torch.long),
                            torch.full((rows, 1), T + step), cache)
    return [(o, f or "length") for o, f in zip(out, finish)]


# --- masks and EOS on the tiny tokenizer (256 byte tokens + 3 specials) ----------------------------

def test_regex_mask_allows_exactly_the_next_bytes_and_eos_only_at_the_end(tiny):
    g = grammars_for(tiny)
    eos = tiny.tokenizer.eos_token_id
    a, b, c = (tok_id(tiny, ch) for ch in "abc")
    m = g.matcher(Constraint.regex("a(b|c)+"))
    assert allowed_ids(m) == [a]
    m.advance(a)
    assert allowed_ids(m) == sorted([b, c]) and not m.is_accepting()
    m.advance(c)  # "ac" is a match and can grow: EOS or more
    assert allowed_ids(m) == sorted([b, c, eos]) and m.is_accepting() and not m.is_terminated()
    m.advance(eos)
    assert m.is_terminated()


def test_a_complete_match_that_cannot_grow_terminates(tiny):
    m = grammars_for(tiny).matcher(Constraint.regex("ab"))
    m.advance(tok_id(tiny, "a"))
    assert not m.is_terminated()
    m.advance(tok_id(tiny, "b"))
    assert m.is_terminated() and allowed_ids(m) == [tiny.tokenizer.eos_token_id]


def test_a_token_outside_the_grammar_is_refused(tiny):
    m = grammars_for(tiny).matcher(Constraint.regex("[0-9]+"))
    with pytest.raises(ConstraintError, match="does not match the grammar"):
        m.advance(tok_id(tiny, "x"))


def test_json_object_starts_with_a_brace_and_never_allows_specials(tiny):
    m = grammars_for(tiny).matcher(Constraint.json_object())
    assert allowed_ids(m) == [tok_id(tiny, "{")]
    m.advance(tok_id(tiny, "{"))
    allowed = set(allowed_ids(m))
    assert tok_id(tiny, '"') in allowed and tok_id(tiny, "}") in allowed
    specials = {tiny.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<pad>")}
    assert not allowed & specials


def test_fork_is_an_independent_copy(tiny):
    a, b = tok_id(tiny, "a"), tok_id(tiny, "b")
    m = grammars_for(tiny).matcher(Constraint.regex("a(a|b)"))
    m.advance(a)
    f = m.fork()
    m.advance(b)
    assert m.is_terminated() and not f.is_terminated()
    assert allowed_ids(f) == sorted([a, b])
    f.advance(a)
    assert f.is_terminated()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # masked with numpy / with torch
def test_mask_logits_changes_only_the_constrained_rows(tiny, dtype):
    """Rows [schema, free, regex, free] of a (4, V + 7) batch (a head wider than the tokenizer): the
    free rows are untouched, bit for bit; a constrained row keeps its allowed logits as they were
    and gets -inf everywhere else, the padded tail included."""
    g = grammars_for(tiny)
    V = g.vocab_size + 7
    ms = [g.matcher(Constraint.json_schema(PERSON)), None, g.matcher(Constraint.regex(PHONE)), None]
    ms[0].advance(tok_id(tiny, "{"))
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)).to(dtype)
    before = logits.clone()
    assert mask_logits(logits, ms) == [None] * 4
    for r in (1, 3):
        assert torch.equal(logits[r], before[r])
    for r in (0, 2):
        allowed = ms[r].allowed(V)
        assert allowed[g.vocab_size:].sum() == 0 and 0 < allowed.sum() < g.vocab_size
        assert torch.equal(logits[r][allowed], before[r][allowed])
        assert torch.isneginf(logits[r][~allowed]).all()
    assert allowed_ids(ms[0]) == [tok_id(tiny, '"')]  # {"name" comes first: the schema's order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_logits_reports_a_row_with_no_token_the_head_can_produce(tiny, dtype):
    g = grammars_for(tiny)
    z = tok_id(tiny, "z")
    logits = torch.zeros(2, z, dtype=dtype)  # a head narrower than the tokenizer: "z" is past it
    errors = mask_logits(logits, [g.matcher(Constraint.regex("z")), g.matcher(Constraint.regex("a"))])
    assert isinstance(errors[0], ConstraintError) and "no token" in str(errors[0])
    assert errors[1] is None and torch.isfinite(logits[1]).sum() == 1


@pytest.mark.parametrize("width", [1000, 1003, 1040])
def test_numpy_and_torch_masking_agree_bit_for_bit(width):
    """Random bitmasks over a 1,003-token vocabulary, heads narrower, equal and wider: both ways of
    masking leave the same logits finite, and exactly the tokens whose bit is set."""
    n, rows = 1003, [0, 2, 3]
    bits = torch.randint(-2**31, 2**31 - 1, (3, (n + 31) // 32), dtype=torch.int32, generator=torch.Generator().manual_seed(width))
    expected = torch.zeros(4, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        for t in range(min(n, width)):
            expected[r, t] = bool((int(bits[i, t // 32]) >> (t % 32)) & 1)
    expected[1] = True  # a free row
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.zeros(4, width, dtype=dtype)
        assert apply_bitmask(logits, rows, bits, n) == [False] * 3
        assert torch.equal(torch.isfinite(logits), expected), dtype


def test_mask_logits_with_no_constrained_row_does_nothing(tiny):
    logits = torch.randn(3, 11)
    before = logits.clone()
    assert mask_logits(logits, [None, None, None]) == [None] * 3
    assert torch.equal(logits, before)


# --- decoding through the tiny model ----------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_sampled_rows_of_a_random_model_always_match(tiny, seed):
    """Sampling at temperature 1 from a random model is the worst writer there is: every row of a
    bounded constraint still finishes within its bound, and what it wrote validates."""
    prompt = tiny.tokenizer.encode("Write it:", add_special_tokens=False)
    out = decode(tiny, prompt, BOUNDED * 2, max_new=160, temperature=1.0, seed=seed)
    for c, (ids, finish) in zip(BOUNDED * 2, out):
        assert finish == "stop"
        check(c, tiny.tokenizer.decode(ids))


def test_any_json_object_parses_when_it_finishes(tiny):
    prompt = tiny.tokenizer.encode("{", add_special_tokens=False)
    c = Constraint.json_object()
    finished = 0
    for seed in range(4):
        for ids, finish in decode(tiny, prompt, [c] * 4, max_new=64, temperature=1.0, seed=seed):
            if finish == "stop":
                finished += 1
                check(c, tiny.tokenizer.decode(ids))
    assert finished > 0


def test_rows_in_a_mixed_batch_decode_as_they_do_alone(tiny):
    """Greedy, constrained and free rows share a batch: each row's tokens equal its tokens alone,
    so a mask reaches only its own row."""
    prompt = tiny.tokenizer.encode("Answer:", add_special_tokens=False)
    rows = [Constraint.json_schema(PERSON), None, Constraint.regex(PHONE), Constraint.json_object(), None]
    together = decode(tiny, prompt, rows, max_new=40)
    for c, got in zip(rows, together):
        assert decode(tiny, prompt, [c], max_new=40)[0] == got
    free, constrained = together[1][0], together[0][0]
    assert free != constrained  # the mask changed the constrained row's tokens
    assert tiny.tokenizer.decode(constrained).startswith('{"name": "')


# --- bad and hostile constraints ---------------------------------------------------------------------

@pytest.mark.parametrize("constraint, message", [
    (Constraint.json_schema({"type": "foo"}), "Invalid type: foo"),
    (Constraint.json_schema({"type": "array", "uniqueItems": True}), 'Unimplemented keys: ["uniqueItems"]'),
    (Constraint.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable schema"),
    (Constraint.json_schema({"$ref": "#/$defs/missing"}), "/$defs/missing"),
    (Constraint.json_schema({"type": "string", "pattern": "(x"}), 'invalid regex "(x": unclosed group'),
    (Constraint.regex("[z-a]"), 'invalid regex "[z-a]": invalid character class range'),
    (Constraint.regex(r"(a)\1"), "backreferences are not supported"),
    (Constraint.json_schema([{"type": "string"}]), "json_schema must be a JSON object"),
    (Constraint.regex(""), "regex must be a non-empty string"),
    (Constraint("xml", "<a/>"), "unknown constraint type 'xml'"),
    (Constraint.json_schema({"type": "number", "maximum": float("nan")}), "not JSON"),
])
def test_a_constraint_the_engine_cannot_compile_names_the_problem(tiny, constraint, message):
    with pytest.raises(ConstraintError) as e:
        grammars_for(tiny).compile(constraint)
    assert message in str(e.value)


def test_a_spec_over_the_size_cap_is_refused_before_compiling(tiny):
    g = Grammars(tiny.tokenizer, max_spec_bytes=1000)
    g._build = None  # never reached
    with pytest.raises(ConstraintError, match=r"json_schema is \d+ bytes as JSON; the limit is 1000"):
        g.compile(Constraint.json_schema({"enum": [f"value-{i}" for i in range(200)]}))


def test_a_schema_nested_past_the_engine_s_depth_is_refused(tiny):
    schema = {"type": "integer"}
    for _ in range(300):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ConstraintError, match="cannot be compiled: recursion limit"):
        grammars_for(tiny).compile(Constraint.json_schema(schema))


def test_the_engine_s_limits_bound_a_large_grammar(tiny):
    """A big enum fits the default limits; with less lexer fuel it is refused, by the engine's count
    of work, not by a clock."""
    big = Constraint.json_schema({"enum": [f"value-{i}" for i in range(2000)]})
    assert grammars_for(tiny).compile(big).matcher().allowed().sum() == 1  # only '"'
    tight = Grammars(tiny.tokenizer, limits=llguidance.LLParserLimits(initial_lexer_fuel=10_000))
    with pytest.raises(ConstraintError, match="too big"):
        tight.compile(big)


def test_a_compile_past_the_time_limit_is_abandoned_then_cached_when_it_ends(tiny):
    """A compile that does not end in time answers ConstraintError at once; it goes on in its worker
    and its result is cached, so it is built once however often it is asked for."""
    g = Grammars(tiny.tokenizer, compile_timeout_s=0.05)
    release, builds, real = threading.Event(), [], g._build

    def slow(c, tok):
        builds.append(c.key)
        release.wait(30)
        return real(c, tok)

    g._build = slow
    c = Constraint.regex("[0-9]{3}")
    with pytest.raises(ConstraintError, match="took longer than 0.05 s to compile"):
        g.compile(c)
    with pytest.raises(ConstraintError, match="took longer than"):
        g.compile(c)  # waits on the same compile: no second build
    release.set()
    g.compile_timeout_s = 30
    assert g.compile(c).matcher().allowed().sum() == 10
    assert g.compile(c) is g.compile(c) and builds == [c.key]


def test_a_compile_done_before_its_callback_is_registered_is_cached(tiny):
    """A build can end before `compile` registers the callback that caches it (the callback then
    runs at once, in the caller): it must not wait for the lock the caller held."""
    g = Grammars(tiny.tokenizer)

    def submit(fn, *args):
        done = Future()
        done.set_result(fn(*args))
        return done

    g._pool = SimpleNamespace(submit=submit)
    c = Constraint.regex("a")
    assert g.compile(c) is g.compile(c)


def test_the_cache_keeps_failures_and_evicts_the_least_recent(tiny):
    g = Grammars(tiny.tokenizer, cache_size=2)
    builds, real = [], g._build
    g._build = lambda c, tok: builds.append(c.spec) or real(c, tok)
    bad = Constraint.json_schema({"type": "foo"})
    for _ in range(3):
        with pytest.raises(ConstraintError, match="Invalid type"):
            g.compile(bad)
    a, b = Constraint.regex("a"), Constraint.regex("b")
    g.compile(a)
    g.compile(b)  # evicts the failure
    g.compile(a)
    with pytest.raises(ConstraintError):
        g.compile(bad)
    assert builds == [bad.spec, "a", "b", bad.spec]
    # Same spec text, same compiled grammar; property order is part of the key (it is the output's order).
    assert g.compile(Constraint.regex("a")) is g.compile(a)
    assert Constraint.json_schema({"a": 1, "b": 2}).key != Constraint.json_schema({"b": 2, "a": 1}).key


# --- the embedded backbone ---------------------------------------------------------------------------

def _chat(bb, text: str) -> list[int]:
    return bb.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)


@pytest.mark.integration
def test_real_backbone_tokenizer_masks_exactly_the_tokens_that_fit(real_backbone):
    """The SmolLM2 tokenizer (49,152 BPE tokens): the first mask of a regex allows exactly the tokens
    whose text can begin a match (checked over the whole vocabulary with `regex`'s partial
    matching), and EOS only once the match is complete."""
    bb = real_backbone
    g = grammars_for(bb)
    assert g.vocab_size == len(bb.tokenizer) and set(g.eos_ids) == bb.eos_token_ids
    pattern = "(yes|no), because [a-z ]+"
    m = g.matcher(Constraint.regex(pattern))
    special = set(bb.tokenizer.all_special_ids)
    fits = {t for t in range(g.vocab_size) if t not in special
            and regex.fullmatch(pattern, bb.tokenizer.decode([t]), partial=True)}
    assert len(fits) > 4 and set(allowed_ids(m)) == fits
    for t in bb.tokenizer.encode("yes, because it", add_special_tokens=False):
        m.advance(t)
    assert m.is_accepting() and not m.is_terminated()
    assert bb.tokenizer.eos_token_id in allowed_ids(m) and tok_id(bb, " is") in allowed_ids(m)


@pytest.mark.integration
def test_real_backbone_outputs_validate_greedy_and_sampled(real_backbone):
    """The embedded backbone asked for a person or a phone number: every bounded constrained row,
    greedy or sampled, finishes and validates, any JSON object parses when it finishes, and the
    free row of the batch is the same as alone."""
    bb = real_backbone
    prompt = _chat(bb, "Describe a person as JSON with a name, an age and whether they are a member, "
                       "or give their phone number.")
    rows = [*BOUNDED, Constraint.json_object(), None]
    greedy = decode(bb, prompt, rows, max_new=48)
    assert decode(bb, prompt, [None], max_new=48)[0] == greedy[3]
    sampled = decode(bb, prompt, BOUNDED * 2, max_new=96, temperature=0.8, seed=1)
    for c, (ids, finish) in zip(rows[:3] + BOUNDED * 2, greedy[:3] + sampled):
        if c.type != "json_object":
            assert finish == "stop"
        if finish == "stop":
            check(c, bb.tokenizer.decode(ids))
