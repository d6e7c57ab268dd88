"""Every batched path against an unbatched reference, on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from modules.core.batch import Contribution, Row, build_pass
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.running import generate
from modules.core.stages import prepare
from modules.kinds.base import NoModule
from modules.registry import kind_class

TEXTS = ["a", "hello there, how are you doing today?", "xyz xyz", "the quick brown fox jumps", "0123456789" * 3,
         "zz top", "mixed batches of many tasks", "ok"]


def _randomize(m, seed: int, std: float):
    """Random weights everywhere (LoRA's B starts at zero): modules that change outputs a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


def _modules(tiny):
    """base, three soft prompts, two LoRAs (different ranks and targets), two prefixes, one composed."""
    mods = [NoModule(tiny)]
    for i, p in enumerate([1, 4, 9]):
        mods.append(_randomize(kind_class("prompt").new(tiny, {"num_virtual_tokens": p}, template="Q: {input}\nA:"),
                               i, 1.0))
    mods.append(_randomize(kind_class("lora").new(tiny, {"targets": ["q_proj", "v_proj"], "r": 4}), 10, 0.3))
    mods.append(_randomize(kind_class("lora").new(tiny, {"targets": ["o_proj", "up_proj", "down_proj"], "r": 2,
                                                         "layers": [1]}), 11, 0.3))
    for i, p in enumerate([3, 7]):
        mods.append(_randomize(kind_class("prefix").new(tiny, {"num_virtual_tokens": p}), 20 + i, 1.0))
    parts = [{"kind": "lora", "config": {"r": 3, "targets": ["k_proj", "gate_proj"]}},
             {"kind": "prompt", "config": {"num_virtual_tokens": 2}}, {"kind": "prefix", "config": {"num_virtual_tokens": 2}}]
    mods.append(_randomize(kind_class("compose").new(tiny, {"parts": parts}), 30, 0.5))
    # input-dependent kinds: their probes run batched too (two depths: one stops early)
    mods.append(_randomize(kind_class("idpt").new(tiny, {"num_virtual_tokens": 5, "encoder_layers": 1}), 40, 0.5))
    mods.append(_randomize(kind_class("idpt").new(tiny, {"num_virtual_tokens": 3, "encoder_layers": 2,
                                                         "encoder_prompt_tokens": 0}), 41, 0.5))
    mods.append(_randomize(kind_class("recursive").new(tiny, {"pass1_prompt_tokens": 2, "pass2_prompt_tokens": 3}),
                           42, 0.3))
    mods.append(_randomize(kind_class("recursive").new(tiny, {"feed": "replace", "connector": "transformer"}),
                           43, 0.3))
    mods.append(_randomize(kind_class("recursive").new(tiny, {"mode": "textual", "pass1_prompt_tokens": 2,
                                                              "candidates": 2, "candidate_tokens": 4}), 44, 0.5))
    return mods


def _rows(tiny, pairs):
    """The prepared row of each (module, text), probes run as one batch."""
    with torch.inference_mode():
        return prepare(tiny, [(m, m.encode(t)) for m, t in pairs])


def _items(tiny, mods, n_new=12):
    pairs = [(mods[(i * 3) % len(mods)], text) for i, text in enumerate(TEXTS * 2)]
    return [GenItem(r.ids, r.contribution, Sampling(max_new_tokens=n_new - (i % 3) * 3))
            for i, r in enumerate(_rows(tiny, pairs))]


def test_base_rows_in_a_mixed_batch_equal_plain_hf_generate(tiny):
    mods = _modules(tiny)
    items = _items(tiny, mods)
    together = generate(tiny, items)
    for it, g in zip(items, together):
        if it.contribution != Contribution():
            continue
        ref = tiny.model.generate(torch.tensor([it.ids]), attention_mask=torch.ones(1, len(it.ids), dtype=torch.long),
                                  max_new_tokens=it.sampling.max_new_tokens, do_sample=False,
                                  eos_token_id=sorted(tiny.eos_token_ids), pad_token_id=tiny.tokenizer.pad_token_id)
        ref_new = ref[0, len(it.ids):].tolist()
        ref_new = [t for t in ref_new if t not in tiny.eos_token_ids and t != tiny.tokenizer.pad_token_id]
        assert g.token_ids == ref_new


def test_soft_prompt_equals_explicit_embedding_concat(tiny):
    """Reference for the prompt kind: a plain forward of [prompt vectors; token embeddings]."""
    m = _modules(tiny)[2]
    ids = m.encode("hello")
    p = build_pass(tiny, [Row(ids, m.contribution(ids)), Row(m.encode("a much longer input than the other"))])
    hidden = tiny.forward(p.embeds, p.mask, p.positions)[0, -1]
    embeds = torch.cat([m.embeddings, tiny.embed(torch.tensor(ids))])[None]
    ref = tiny.model(inputs_embeds=embeds).logits[0, -1]
    torch.testing.assert_close(tiny.logits(hidden), ref, atol=1e-4, rtol=1e-4)


def test_scores_batched_equal_alone_and_multi_token_path(tiny):
    mods = _modules(tiny)
    single = [[tiny.tokenizer(" y", add_special_tokens=False)["input_ids"][0]],
              [tiny.tokenizer(" n", add_special_tokens=False)["input_ids"][0]]]
    multi = [tiny.tokenizer(" yes", add_special_tokens=False)["input_ids"],
             tiny.tokenizer(" no", add_special_tokens=False)["input_ids"]]
    with torch.inference_mode():
        for conts in (single, multi):
            items = [ScoreItem(r.ids, r.contribution, conts) for r in _rows(tiny, list(zip(mods * 2, TEXTS)))]
            together = score(tiny, items)
            for it, ll in zip(items, together):
                torch.testing.assert_close(ll, score(tiny, [it])[0], atol=1e-4, rtol=1e-4)
        # one-token continuations: the fast path equals the general path
        it = items[1]
        fast = score(tiny, [ScoreItem(it.ids, it.contribution, single)])[0]
        general = score(tiny, [ScoreItem(it.ids, it.contribution, [single[0], single[1], multi[0]])])[0][:2]
        torch.testing.assert_close(fast, general, atol=1e-4, rtol=1e-4)


def test_stop_strings_and_max_tokens(tiny):
    m = NoModule(tiny)
    ids = m.encode("hello")
    free = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=20))])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop = free.text[5:7]
    cut = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=20, stop=[stop]))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.9, 1.0, 0), (1.3, 0.8, 0), (0.7, 1.0, 5)])
def test_sampling_is_seeded_per_row(tiny, temperature, top_p, top_k):
    m = NoModule(tiny)
    ids = m.encode("hello")

    def run(seed, batch_with_other=False):
        s = Sampling(max_new_tokens=16, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        items = [GenItem(ids, Contribution(), s)]
        if batch_with_other:
            items.append(GenItem(m.encode("other row"), Contribution(), Sampling(max_new_tokens=5, temperature=1.0)))
        return generate(tiny, items)[0].token_ids

    assert run(1) == run(1) == run(1, batch_with_other=True)
    assert len({tuple(run(s)) for s in range(6)}) > 1


def test_streamed_pieces_add_up_to_the_text(tiny):
    m = NoModule(tiny)
    pieces: list[str] = []
    ids = m.encode("stream me")
    g = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=15, stop=["zz"]),
                                 lambda piece, _: pieces.append(piece))])[0]
    assert "".join(pieces) == g.text


def test_incremental_text_equals_a_full_decode(tiny):
    """Random token streams (special tokens and split UTF-8 characters included): the text built a
    window at a time, and the streamed pieces, equal decoding everything at once."""
    import random

    from modules.core.decode import _RowState

    rng = random.Random(0)
    tok = tiny.tokenizer
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        pieces: list[str] = []
        row = _RowState(GenItem([], Contribution(), Sampling(max_new_tokens=len(ids)),
                                    lambda piece, _: pieces.append(piece)), tok, set())
        for t in ids:
            row.push(t)
        full = tok.decode(ids, skip_special_tokens=True)
        assert row.text == full == "".join(pieces) and row.finish == "length"
