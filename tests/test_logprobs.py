"""Log probabilities of generated tokens (`parameters.logprobs`, OpenAI `logprobs`/`top_logprobs`):
against a plain forward of the whole sequence, the same alone, batched or joined mid-decode, streamed
in pieces that add up, and through /infer, the OpenAI package, the Python client and the CLI."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from modules.core.batch import Contribution
from modules.core.decode import GenItem, Sampling
from modules.core.running import RunningBatch, generate
from modules.kinds.base import NoModule
from modules.registry import kind_class
from service.app import create_app
from service.config import Settings
from tests.test_batching import _items, _modules

TOL = 1e-5  # fp32: a row's logprobs batched and alone agree to float rounding


def _with_logprobs(item: GenItem, k: int, **sampling) -> GenItem:
    return GenItem(item.ids, item.contribution, replace(item.sampling, logprobs=k, **sampling))


def _reference(bb, ids: list[int], generated: list[int], k: int):
    """Each generated token's logprob and the k best of its step, from one plain HF forward over the
    whole sequence (no cache, no batching): [(logprob, [(id, logprob)] * k)]."""
    with torch.inference_mode():
        logits = bb.model(input_ids=torch.tensor([ids + generated])).logits[0].float()        # (T, V)
    logp = torch.log_softmax(logits[len(ids) - 1:len(ids) - 1 + len(generated)], -1)          # (G, V)
    top = logp.topk(k, -1)
    return [(float(logp[g, t]), list(zip(top.indices[g].tolist(), top.values[g].tolist())))
            for g, t in enumerate(generated)]


def _assert_close(got, want, tol=TOL) -> float:
    """Two rows' logprob entries: the same tokens and alternatives, logprobs within tol, relative to
    the logprob's size past 1 (float32 rounds a logprob of -20 twenty times coarser than one of -1).
    Returns the largest such difference."""
    assert [t.id for t in got] == [t.id for t in want]
    worst = 0.0
    for a, b in zip(got, want):
        assert [x.id for x in a.top] == [x.id for x in b.top]
        for x, y in [(a, b), *zip(a.top, b.top)]:
            worst = max(worst, abs(x.logprob - y.logprob) / max(1.0, abs(y.logprob)))
    assert worst <= tol, worst
    return worst


def test_logprobs_are_the_models_log_softmax_before_temperature(tiny):
    """Greedy and sampled rows (temperature 1.7, top-k 4): every token's logprob and its step's 5
    best equal a plain forward of the whole sequence, unscaled by temperature; the chosen token of a
    greedy row is its step's best."""
    ids = NoModule(tiny).encode("hello there")
    greedy = GenItem(ids, Contribution(), Sampling(max_new_tokens=10, logprobs=5))
    sampled = GenItem(ids, Contribution(), Sampling(max_new_tokens=10, temperature=1.7, top_k=4, seed=3, logprobs=5))
    for g in generate(tiny, [greedy, sampled]):
        assert len(g.logprobs) == len(g.token_ids) > 0
        for entry, (lp, top) in zip(g.logprobs, _reference(tiny, ids, g.token_ids, 5)):
            assert abs(entry.logprob - lp) <= TOL
            assert [a.id for a in entry.top] == [i for i, _ in top]
            assert all(abs(a.logprob - v) <= TOL for a, (_, v) in zip(entry.top, top))
            assert entry.text == tiny.tokenizer.decode([entry.id])
    greedy_row = generate(tiny, [greedy])[0]
    assert all(e.id == e.top[0].id for e in greedy_row.logprobs)
    sampled_row = generate(tiny, [sampled])[0]
    assert any(e.id != e.top[0].id for e in sampled_row.logprobs)  # temperature 1.7 picked a non-best token
    assert all(e.id in [a.id for a in e.top[:4]] for e in sampled_row.logprobs)  # top-k 4


def test_logprobs_of_every_kind_same_alone_batched_and_joined_mid_decode(tiny):
    """Rows of every kind (soft prompts, prefixes, LoRAs, composed, probing kinds' final rows), some
    sampled: their logprobs and alternatives alone, batched together, and joining a running batch at
    different steps agree within 1e-5; the tokens are the same."""
    items = [_with_logprobs(it, 3, **({"temperature": 0.9, "seed": i} if i % 3 == 0 else {}))
             for i, it in enumerate(_items(tiny, _modules(tiny), n_new=10))]
    alone = [generate(tiny, [it])[0] for it in items]
    batched = generate(tiny, items)
    rng = random.Random(1)
    schedule: dict[int, list[GenItem]] = {}
    for it in items:
        schedule.setdefault(rng.choice([0, 0, 1, 2, 5, 8]), []).append(it)
    batch, joined, k = RunningBatch(tiny, slots=2), {}, 0
    while k <= max(schedule) or len(batch):
        batch.join(schedule.get(k, []))
        joined.update({id(it): g for it, g in batch.step()})
        k += 1
    for it, a, b in zip(items, alone, batched):
        assert a.token_ids == b.token_ids == joined[id(it)].token_ids
        assert len(a.logprobs) == len(a.token_ids)
        _assert_close(b.logprobs, a.logprobs)
        _assert_close(joined[id(it)].logprobs, a.logprobs)


def test_rows_without_logprobs_get_none_and_zero_gives_no_alternatives(tiny):
    ids = NoModule(tiny).encode("abc")
    plain, zero = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=5)),
                                  GenItem(ids, Contribution(), Sampling(max_new_tokens=5, logprobs=0))])
    assert plain.logprobs is None
    assert plain.token_ids == zero.token_ids and [e.id for e in zero.logprobs] == zero.token_ids
    assert all(e.top == () for e in zero.logprobs)


@pytest.mark.parametrize("stop", [[], ["e"], ["zz"]])
def test_streamed_logprobs_add_up_and_bytes_are_exact(tiny, stop):
    """Streamed pieces carry the logprobs of the tokens whose text ends in them: together they are
    the row's logprobs, one per token id (a stop string's tokens included, EOS not); the tokens'
    bytes, joined, are the bytes of the whole generation (split UTF-8 characters included)."""
    ids = NoModule(tiny).encode("stream me")
    for seed in range(6):
        pieces, streamed = [], []
        item = GenItem(ids, Contribution(), Sampling(max_new_tokens=24, temperature=1.0, seed=seed, stop=stop,
                                                     logprobs=2),
                       lambda piece, tokens: (pieces.append(piece), streamed.extend(tokens)))
        g = generate(tiny, [item])[0]
        assert "".join(pieces) == g.text
        assert streamed == g.logprobs and [e.id for e in g.logprobs] == g.token_ids
        whole = tiny.tokenizer.decode(g.token_ids)
        assert b"".join(e.bytes for e in g.logprobs).decode("utf-8", "replace") == whole
        if not stop:
            assert whole == g.text


# --- /infer in-process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny):
    settings = Settings(store_dir=tmp_path_factory.mktemp("store"), examples=False, max_input_tokens=64,
                        max_new_tokens=32, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as client:
        labels = kind_class("prompt").new(tiny, {"num_virtual_tokens": 2}, labels={"a": " a", "b": " b"})
        assert client.put("/tasks/cls", content=labels.to_artifact()).status_code == 201
        yield client


def test_infer_returns_each_tokens_logprob_and_alternatives(app_client, tiny):
    body = {"inputs": ["hello", "a longer input"], "parameters": {"max_new_tokens": 6, "logprobs": 3}}
    r = app_client.post("/tasks/base/infer", json=body)
    assert r.status_code == 200, r.text
    for text, out in zip(body["inputs"], r.json()["outputs"]):
        ids = NoModule(tiny).encode(text)
        want = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=6, logprobs=3))])[0]
        assert [t["id"] for t in out["logprobs"]] == want.token_ids
        for t, w in zip(out["logprobs"], want.logprobs):
            assert (t["token"], bytes(t["bytes"])) == (w.text, w.bytes) and abs(t["logprob"] - w.logprob) <= TOL
            assert [a["id"] for a in t["top_logprobs"]] == [a.id for a in w.top] and len(w.top) == 3
    plain = app_client.post("/tasks/base/infer", json={"inputs": "hello", "parameters": {"max_new_tokens": 6}})
    assert "logprobs" not in plain.json()["outputs"][0]


@pytest.mark.parametrize("params, named", [({"logprobs": 21}, "parameters.logprobs"),
                                           ({"logprobs": -1}, "parameters.logprobs"),
                                           ({"logprobs": "many"}, "parameters.logprobs")])
def test_bad_logprobs_are_422_naming_the_parameter(app_client, params, named):
    r = app_client.post("/tasks/base/infer", json={"inputs": "x", "parameters": params})
    assert r.status_code == 422 and named in r.json()["error"]["message"]


def test_logprobs_on_a_label_scoring_request_is_422(app_client):
    for task, params in (("cls", {"logprobs": 2}), ("base", {"logprobs": 0, "choices": [" yes", " no"]})):
        r = app_client.post(f"/tasks/{task}/infer", json={"inputs": "x", "parameters": params})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_parameters" and err["message"].startswith("logprobs:") and "scores" in err["message"]
    r = app_client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                      "top_logprobs": 2})
    assert r.status_code == 422 and "top_logprobs" in r.json()["error"]["message"]
    r = app_client.post("/v1/completions", json={"model": "base", "prompt": "x", "logprobs": 21})
    assert r.status_code == 422 and "logprobs" in r.json()["error"]["message"]


# --- a real server: streaming, the openai package, the client, the CLI, the static engine --------


@pytest.fixture(scope="module")
def served_tiny(tiny_served, tmp_path_factory):
    from tests.adversary import served

    env = {"FROZENLM_BACKBONE": str(tiny_served[0]), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_THREADS": "1"}
    with served(env, tmp_path_factory.mktemp("lp-store")) as s:
        yield s.url


def _sse(response):
    from tests.test_continuous_http import sse_events

    return sse_events(response)


def test_infer_stream_carries_the_logprobs_of_the_whole_answer(served_tiny):
    body = {"inputs": "stream it", "parameters": {"max_new_tokens": 20, "logprobs": 2, "stop": ["q"]}}
    whole = httpx.post(f"{served_tiny}/tasks/base/infer", json=body, timeout=60).json()["outputs"][0]
    text, tokens, done = "", [], None
    with httpx.stream("POST", f"{served_tiny}/tasks/base/infer", json={**body, "stream": True}, timeout=60) as r:
        for event, data in _sse(r):
            if event == "done":
                done = json.loads(data)["outputs"][0]
            else:
                assert event == "message", data
                piece = json.loads(data)
                assert "index" not in piece  # n = 1
                text, tokens = text + piece["text"], tokens + piece["logprobs"]
    assert text == whole["text"] == done["text"]
    assert tokens == done["logprobs"] and len(tokens) > 0
    # the second request starts from the prefix cache: the same values to float rounding
    assert [t["id"] for t in tokens] == [t["id"] for t in whole["logprobs"]]
    assert all(abs(a["logprob"] - b["logprob"]) <= TOL for a, b in zip(tokens, whole["logprobs"]))


def test_the_openai_package_parses_logprobs_streamed_and_not(served_tiny):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_tiny}/v1", api_key="none", max_retries=0)
    infer = httpx.post(f"{served_tiny}/tasks/base/infer", timeout=60,
                       json={"inputs": "hi there", "parameters": {"max_new_tokens": 8, "logprobs": 3}}).json()
    want = infer["outputs"][0]["logprobs"]

    done = client.completions.create(model="base", prompt="hi there", max_tokens=8, logprobs=3)
    lp = done.choices[0].logprobs
    assert lp.tokens == [t["token"] for t in want]
    assert all(abs(a - t["logprob"]) <= TOL for a, t in zip(lp.token_logprobs, want))
    for alternatives, t in zip(lp.top_logprobs, want):  # the k best and the chosen token, keyed by text
        assert t["token"] in alternatives and len(alternatives) <= 4
        assert max(alternatives.values()) == pytest.approx(t["top_logprobs"][0]["logprob"], abs=TOL)
    assert lp.text_offset == [sum(len(t["token"]) for t in want[:i]) for i in range(len(want))]

    stream = client.completions.create(model="base", prompt="hi there", max_tokens=8, logprobs=3, stream=True)
    tokens, offsets = [], []
    for chunk in stream:
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset

    msgs = [{"role": "user", "content": "hi there"}]
    chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [t["token"] for t in want]
    assert [[a.token for a in c.top_logprobs] for c in content] == [[a["token"] for a in t["top_logprobs"][:2]]
                                                                    for t in want]
    assert b"".join(bytes(c.bytes) for c in content) == b"".join(bytes(t["bytes"]) for t in want)
    streamed = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, logprobs=True,
                                              top_logprobs=2, stream=True)
    parts = [c for chunk in streamed if chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in parts] == [(c.token, c.logprob) for c in content]
    assert client.chat.completions.create(model="base", messages=msgs, max_tokens=4).choices[0].logprobs is None


def test_the_client_and_the_cli_take_logprobs(served_tiny, capsys):
    from clients import Client
    from clients.cli import main as cli

    with Client(served_tiny) as c:
        out = c.infer("base", "hello", max_new_tokens=5, logprobs=2).outputs[0]
    assert len(out.logprobs) > 0 and all(len(t.top_logprobs) == 2 for t in out.logprobs)
    assert isinstance(out.logprobs[0].bytes, bytes) and out.logprobs[0].top_logprobs[0].logprob >= out.logprobs[0].logprob
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--max-new-tokens", "5", "--logprobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    token_lines = [ln for ln in lines if ln.startswith("  ")]
    assert len(token_lines) == len(out.logprobs)
    assert [float(ln.split("\t")[1]) for ln in token_lines] == pytest.approx([t.logprob for t in out.logprobs], abs=1e-4)
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--logprobs", "21"]) == 1
    assert "parameters.logprobs" in capsys.readouterr().err


def test_the_static_engine_answers_the_same_logprobs(served_tiny, tiny_served, tmp_path):
    from tests.adversary import served

    body = {"inputs": ["hello", "zz top"], "parameters": {"max_new_tokens": 8, "logprobs": 2, "temperature": 0.8,
                                                          "seed": 5}}
    want = httpx.post(f"{served_tiny}/tasks/base/infer", json=body, timeout=60).json()["outputs"]
    env = {"FROZENLM_BACKBONE": str(tiny_served[0]), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_THREADS": "1", "FROZENLM_ENGINE": "static"}
    with served(env, tmp_path / "store") as s:
        got = httpx.post(f"{s.url}/tasks/base/infer", json=body, timeout=60).json()["outputs"]
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and [t["id"] for t in g["logprobs"]] == [t["id"] for t in w["logprobs"]]
        assert all(abs(a["logprob"] - b["logprob"]) <= TOL for a, b in zip(g["logprobs"], w["logprobs"]))


# --- the real backbone ---------------------------------------------------------------------------


@pytest.mark.integration
def test_real_backbone_logprobs_match_a_full_forward_alone_batched_and_joined(real_backbone):
    """SmolLM2: a base row's logprobs equal a plain forward of the whole sequence; rows of the base,
    a soft prompt and a LoRA, batched or joining mid-decode, get their alone logprobs (fp32); the
    tokens' bytes add up to the text (accented characters included)."""
    bb = real_backbone
    base = NoModule(bb)
    prompt = kind_class("prompt").new(bb, {"num_virtual_tokens": 4, "seed": 1}, template="Question: {input}\nAnswer:")
    lora = kind_class("lora").new(bb, {"targets": ["q_proj", "v_proj"], "r": 4, "seed": 2})
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    texts = ["Écris une phrase en français sur l'été.", "What is the capital of France?", "Name three colors."]
    items = [GenItem(m.encode(t), m.contribution(m.encode(t)), Sampling(max_new_tokens=10, logprobs=5))
             for m in (base, prompt, lora) for t in texts[:2]]
    alone = [generate(bb, [it])[0] for it in items]
    for it, a in ((items[0], alone[0]), (items[1], alone[1])):
        for e, (lp, top) in zip(a.logprobs, _reference(bb, it.ids, a.token_ids, 5)):
            assert abs(e.logprob - lp) <= 1e-4 and [x.id for x in e.top] == [i for i, _ in top]
        assert b"".join(e.bytes for e in a.logprobs).decode("utf-8", "replace") == bb.tokenizer.decode(a.token_ids)
    batched = generate(bb, items)
    batch, joined, k = RunningBatch(bb), {}, 0
    while k < 4 or len(batch):
        batch.join(items[k * 2:k * 2 + 2] if k < 3 else [])
        joined.update({id(it): g for it, g in batch.step()})
        k += 1
    worst = []
    for it, a, b in zip(items, alone, batched):
        assert a.token_ids == b.token_ids == joined[id(it)].token_ids
        worst += [_assert_close(b.logprobs, a.logprobs), _assert_close(joined[id(it)].logprobs, a.logprobs)]
    print(f"largest relative logprob difference, batched or joined against alone: {max(worst):.2e}")
