"""The running batch (rows join and leave between decode steps) against each row alone."""

from __future__ import annotations

import random

import pytest

from modules.core.batch import Contribution
from modules.core.decode import GenItem, Sampling
from modules.core.running import RunningBatch, generate
from tests.test_batching import _items, _modules


def _run(tiny, schedule: dict[int, list[GenItem]], slots: int = 8) -> dict[int, object]:
    """Join schedule[k] before step k; step until every row has finished. {id(item): Generated}"""
    batch, out, k = RunningBatch(tiny, slots=slots), {}, 0
    while k <= max(schedule) or len(batch):
        if schedule.get(k):
            batch.join(schedule[k])
        out.update({id(item): g for item, g in batch.step()})
        k += 1
    return out


def _alone(tiny, items):
    return {id(it): generate(tiny, [it])[0] for it in items}


def test_rows_joining_at_different_steps_get_their_alone_tokens(tiny):
    """Every kind (soft prompts, prefixes, LoRAs, composed, probing kinds' final rows), joining
    while others are mid-decode at several steps, produces the greedy tokens it produces alone."""
    items = _items(tiny, _modules(tiny), n_new=10)
    rng = random.Random(0)
    schedule: dict[int, list[GenItem]] = {}
    for it in items:
        schedule.setdefault(rng.choice([0, 0, 1, 3, 4, 7, 12]), []).append(it)
    alone, joined = _alone(tiny, items), _run(tiny, schedule)
    assert len(joined) == len(items)
    for it in items:
        assert joined[id(it)].token_ids == alone[id(it)].token_ids
        assert joined[id(it)].finish_reason == alone[id(it)].finish_reason


def test_leaving_in_any_order_changes_nobody_and_buffers_reshape(tiny):
    """Rows of many lengths leave at different steps; a long prompt joins late (room on the left),
    more rows than slots join (slots grow), and the survivors' tokens never change."""
    items = _items(tiny, _modules(tiny), n_new=9)
    long = GenItem(tiny.tokenizer("long " * 40)["input_ids"], Contribution(), Sampling(max_new_tokens=6))
    schedule = {0: items[:3], 2: items[3:14], 5: [long] + items[14:]}
    alone, joined = _alone(tiny, items + [long]), _run(tiny, schedule, slots=2)
    for it in items + [long]:
        assert joined[id(it)].token_ids == alone[id(it)].token_ids


def test_seeded_sampled_row_same_alone_or_joined(tiny):
    mods = _modules(tiny)
    items = _items(tiny, mods, n_new=8)
    sampled = GenItem(items[1].ids, items[1].contribution, Sampling(max_new_tokens=8, temperature=0.9, seed=7))
    again = GenItem(items[1].ids, items[1].contribution, Sampling(max_new_tokens=8, temperature=0.9, seed=7))
    joined = _run(tiny, {0: items[:5], 3: [sampled]})
    assert joined[id(sampled)].token_ids == generate(tiny, [again])[0].token_ids


def test_a_failing_row_fails_alone(tiny):
    """A module whose delta raises mid-decode fails its own row; the others keep their tokens."""
    items = _items(tiny, _modules(tiny), n_new=8)[:6]

    class Broken:
        keys = frozenset({"layers.0.self_attn.q_proj"})
        calls = 0

        def __call__(self, key, x, y):
            Broken.calls += 1
            if x.shape[1] == 1:  # fine while prefilling, fails while decoding
                raise RuntimeError("boom")
            return y

    bad = GenItem(items[0].ids, Contribution(linear=Broken()), Sampling(max_new_tokens=8))
    joined = _run(tiny, {0: items[:3], 2: [bad] + items[3:]})
    alone = _alone(tiny, items)
    assert joined[id(bad)].finish_reason == "error" and "boom" in str(joined[id(bad)].error)
    for it in items:
        assert joined[id(it)].token_ids == alone[id(it)].token_ids


def test_kv_tokens_count_live_rows_only(tiny):
    items = [GenItem(tiny.tokenizer(t)["input_ids"], Contribution(), Sampling(max_new_tokens=n, ignore_eos=True))
             for t, n in (("hello", 2), ("a longer prompt here", 5))]
    batch = RunningBatch(tiny)
    batch.join(items)
    assert batch.tokens == 0 and batch.waiting == 2 and len(batch) == 2  # nothing prefilled before a step
    batch.step()  # prefill (first tokens), then a decode step: the 2-token row has its second and leaves
    assert len(batch) == 1 and batch.tokens == len(items[1].ids) + 1
    batch.step()
    assert batch.tokens == len(items[1].ids) + 2

# --- prefix caching -------------------------------------------------------------------------------

HEAD = "You are a careful assistant. Read the request below and answer it in one short line. " * 2


def _cache_items(tiny, mods, texts, n=6):
    from modules.core.prefix_cache import content_key

    out = []
    for m in mods:
        for t in texts:
            ids = m.encode(HEAD + t)
            out.append(GenItem(ids, m.contribution(ids), Sampling(max_new_tokens=n), prefix_key=content_key(m)))
    return out


def test_a_prefix_cache_hit_gives_the_tokens_of_a_miss(tiny):
    """Rows of prompt, prefix, LoRA, composed and base modules sharing a 40-token head: the second
    wave finds the head's blocks cached and gets exactly the tokens the first wave got."""
    from modules.core.prefix_cache import BLOCK, PrefixCache

    mods = [m for m in _modules(tiny) if not m.probes]
    cache = PrefixCache(max_tokens=100_000)
    first = _cache_items(tiny, mods, ["one", "and two"])
    alone = _alone(tiny, first)
    batch, done = RunningBatch(tiny, prefix_cache=cache), {}
    batch.join(first)
    while batch.waiting:  # prefilled in chunks over several steps
        done.update({id(i): g for i, g in batch.step()})
    assert cache.hits == 0 and cache.tokens > 0
    second = _cache_items(tiny, mods, ["one", "three, four and five"])
    batch.join(second)
    assert cache.hits == len(second)  # every row found at least its first block
    while len(batch):
        done.update({id(i): g for i, g in batch.step()})
    for it in first:
        assert done[id(it)].token_ids == alone[id(it)].token_ids
    for it, again in zip(second, _alone(tiny, second).values()):
        assert done[id(it)].token_ids == again.token_ids
    assert len(tiny.tokenizer(HEAD)["input_ids"]) > 2 * BLOCK  # the head covers several blocks


def test_the_prefix_cache_is_keyed_by_content_and_bounded(tiny):
    from modules.core.prefix_cache import BLOCK, PrefixCache, content_key
    from modules.registry import kind_class
    from tests.test_batching import _randomize

    a = _randomize(kind_class("prompt").new(tiny, {"num_virtual_tokens": 3}), 1, 1.0)
    b = _randomize(kind_class("prompt").new(tiny, {"num_virtual_tokens": 3}), 2, 1.0)  # same name-free shape, other weights
    same_as_a = kind_class("prompt").from_tensors(a.manifest, a.tensors(), tiny)      # a reloaded copy of a
    assert content_key(a) != content_key(b) and content_key(a) == content_key(same_as_a)
    cache = PrefixCache(max_tokens=100_000)
    batch = RunningBatch(tiny, prefix_cache=cache)
    for module, text in ((a, "x"), (b, "x"), (same_as_a, "y")):
        batch.join(_cache_items(tiny, [module], [text], n=1))
        batch.step()
        assert cache.hits == (module is same_as_a)  # b never reads a's keys/values; a's copy does
    small = PrefixCache(max_tokens=3 * BLOCK)
    batch = RunningBatch(tiny, prefix_cache=small)
    batch.join(_cache_items(tiny, [a, b], ["x"], n=1))
    batch.step()
    assert 0 < small.tokens <= 3 * BLOCK


def test_long_prompts_prefilled_in_chunks_get_their_alone_tokens(tiny):
    """A per-step prefill budget of 7 tokens: every row (soft prompts, prefixes, LoRAs, composed)
    is prefilled over several steps while others decode, and still gets its alone tokens."""
    items = _items(tiny, _modules(tiny), n_new=6)
    batch, done, k = RunningBatch(tiny, prefill_tokens=7), {}, 0
    chunked = 0
    while k < len(items) or len(batch):
        if k < len(items):
            batch.join(items[k:k + 3])
            k += 3
        chunked += batch.waiting > 0
        done.update({id(i): g for i, g in batch.step()})
    alone = _alone(tiny, items)
    assert chunked > len(items) // 3  # rows waited for their prefill over several steps
    for it in items:
        assert done[id(it)].token_ids == alone[id(it)].token_ids


@pytest.mark.integration
def test_joining_on_the_real_backbone_gives_the_alone_tokens(real_backbone):
    """On the embedded SmolLM2 (fp32): rows of LoRA, soft-prompt, prefix and composed modules join
    at steps 0, 2 and 5 of each other's decoding; each gets its alone tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from mixed_batch import mixed_modules

    bb = real_backbone
    mods = mixed_modules(bb)
    items = [GenItem(m.encode(t), m.contribution(m.encode(t)), Sampling(max_new_tokens=8))
             for m, t in zip(mods[::3], ["What is the capital of Italy?", "Name a famous painter.", "Hi!"] * 2)]
    alone = _alone(bb, items)
    batch, done = RunningBatch(bb), {}
    for k in range(30):
        if k in (0, 2, 5):
            batch.join(items[{0: 0, 2: 2, 5: 4}[k]:][:2])
        done.update({id(i): g for i, g in batch.step()})
    for it in items:
        assert done[id(it)].token_ids == alone[id(it)].token_ids
