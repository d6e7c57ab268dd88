"""Attacks on the continuous engine (service/continuous.py, modules/core/running.py, modules/core/prefix_cache.py)
through a real server: streaming beside long generations, disconnects, deadlines, hot-swaps and the
prefix cache, a small KV budget, concurrent mixed requests against the same requests alone, memory,
and the static engine.

Servers (tiny random Llama): `srv` (continuous, defaults), `ref` (continuous, KV budget 4096,
prefix cache off: the references for the prefix cache and the small-budget probes), `short`
(a 2 s deadline) and `static` (FROZENLM_ENGINE=static)."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from modules.registry import kind_class
from tests.adversary import assert_ready, peak_growth_mb, served

ADMIN = {"Authorization": "Bearer cont-admin"}
LONG_TEMPLATE = ("You are a careful assistant. Read the following text and continue it in the same style, "
                 "keeping the tone and the vocabulary of the original author. Text: {input}\nContinuation:")
LONG = 1000  # new tokens of a "long" generation (the tiny model makes ~700 tokens a second)


def _env(folder, **more):
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_ADMIN_KEY": "cont-admin", "FROZENLM_THREADS": "1"}
    env.update({f"FROZENLM_{k.upper()}": str(v) for k, v in more.items()})
    return env


def _modules(bb):
    prompt = kind_class("prompt")
    sst2 = prompt.new(bb, {"num_virtual_tokens": 2}, template="Review: {input}\nSentiment:",
                      labels={"negative": "n", "positive": "p"})
    gen = prompt.new(bb, {"num_virtual_tokens": 3}, template="Q: {input}\nA:")
    v1 = prompt.new(bb, {"num_virtual_tokens": 4}, template=LONG_TEMPLATE)
    v2 = prompt.new(bb, {"num_virtual_tokens": 4}, template=LONG_TEMPLATE)
    with torch.no_grad():  # same manifest, different weights
        v2.embeddings.add_(torch.randn(v2.embeddings.shape, generator=torch.Generator().manual_seed(7)) * 0.5)
    return {"sst2": sst2.to_artifact(), "gen": gen.to_artifact(), "v1": v1.to_artifact(), "v2": v2.to_artifact()}


def _put(url, name, artifact):
    r = httpx.put(f"{url}/tasks/{name}", content=artifact, headers=ADMIN, timeout=60)
    assert r.status_code == 201, r.text


_ARTS = {}


def _modules_cache():
    return _ARTS


@pytest.fixture(scope="module")
def arts(tiny_served):
    _ARTS.update(_modules(tiny_served[1]))
    return _ARTS


@pytest.fixture(scope="module")
def srv(tiny_served, tmp_path_factory, arts):
    root = tmp_path_factory.mktemp("continuous")
    with served(_env(tiny_served[0], request_timeout_s=120, prefill_tokens=64), root / "store") as s:
        for name in ("sst2", "gen", "v1", "v2"):
            _put(s.url, name, arts[name])
        yield s


@pytest.fixture(scope="module")
def ref(tiny_served, tmp_path_factory, arts):
    root = tmp_path_factory.mktemp("reference")
    with served(_env(tiny_served[0], kv_tokens=4096, prefix_cache_tokens=0, request_timeout_s=120,
                     max_queue=16), root / "store") as s:
        for name in ("sst2", "gen", "v1", "v2"):
            _put(s.url, name, arts[name])
        yield s


def infer(url, task, inputs, timeout=120, **params):
    r = httpx.post(f"{url}/tasks/{task}/infer", json={"inputs": inputs, "parameters": params}, headers=ADMIN,
                   timeout=timeout)
    return r


def ok(url, task, inputs, **params):
    r = infer(url, task, inputs, **params)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def metric(url, name) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def sse_events(response):
    """(event, data) pairs of a server-sent events response, as they arrive."""
    event, data = "message", []
    for line in response.iter_lines():
        line = line.rstrip("\r")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])


def background(fn, n=1):
    pool = ThreadPoolExecutor(n)
    return pool, [pool.submit(fn, i) for i in range(n)]


def long_gen(url, task="gen", text="tell me a very long story", n=LONG, timeout=120):
    return infer(url, task, text, timeout=timeout, max_new_tokens=n)


# --- (1) streaming beside long generations ------------------------------------------------------------


def test_stream_pieces_add_up_and_arrive_before_long_generations_finish(srv):
    alone = ok(srv.url, "gen", "stream me", max_new_tokens=40)[0]["text"]
    pool, longs = background(lambda i: long_gen(srv.url, text=f"long story {i}"), 3)
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") >= 1, 30)
    pieces, first_at, done = [], None, None
    with httpx.stream("POST", f"{srv.url}/tasks/gen/infer", headers=ADMIN, timeout=120,
                      json={"inputs": "stream me", "stream": True, "parameters": {"max_new_tokens": 40}}) as r:
        assert r.status_code == 200
        for event, data in sse_events(r):
            if event == "message":
                if first_at is None:
                    first_at = time.monotonic()
                    long_done_at_first = sum(f.done() for f in longs)
                pieces.append(json.loads(data)["text"])
            elif event == "done":
                done = json.loads(data)
            else:
                pytest.fail(f"{event}: {data}")
    assert "".join(pieces) == alone == done["outputs"][0]["text"]
    assert first_at is not None and long_done_at_first == 0
    for f in longs:
        assert f.result().status_code == 200
    pool.shutdown()


def test_openai_chat_stream_adds_up_to_the_non_streamed_answer(srv):
    body = {"model": "gen", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 30}
    whole = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers=ADMIN, timeout=120)
    assert whole.status_code == 200, whole.text
    pool, longs = background(lambda i: long_gen(srv.url, text=f"chat long {i}"), 2)
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") >= 1, 30)
    text, finished = "", None
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", headers=ADMIN, timeout=120,
                      json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for _, data in sse_events(r):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["delta"].get("content", "")
            finished = chunk["choices"][0]["finish_reason"] or finished
    assert text == whole.json()["choices"][0]["message"]["content"]
    assert finished == whole.json()["choices"][0]["finish_reason"]
    assert [f.result().status_code for f in longs] == [200, 200]
    pool.shutdown()


def _stream_text(url, task, text, params):
    pieces, done = [], None
    with httpx.stream("POST", f"{url}/tasks/{task}/infer", headers=ADMIN, timeout=120,
                      json={"inputs": text, "stream": True, "parameters": params}) as r:
        assert r.status_code == 200
        for event, data in sse_events(r):
            if event == "message":
                pieces.append(json.loads(data)["text"])
            elif event == "done":
                done = json.loads(data)["outputs"][0]
            else:
                pytest.fail(f"{event}: {data}")
    return "".join(pieces), done


STREAMS = [("gen", f"stream {i}", {"max_new_tokens": 150, "temperature": 1.5, "seed": i}) for i in range(6)] + [
    ("v1", f"stop {i}", {"max_new_tokens": 150, "stop": ["a", "e", "\ufffd"]}) for i in range(3)] + [
    ("gen", f"greedy {i}", {"max_new_tokens": 200}) for i in range(3)]


@pytest.mark.parametrize("task,text,params", STREAMS)
def test_stream_pieces_equal_the_streams_final_and_the_non_streamed_text(srv, task, text, params):
    whole = ok(srv.url, task, text, **params)[0]
    joined, done = _stream_text(srv.url, task, text, params)
    assert done["text"] == whole["text"] and done["finish_reason"] == whole["finish_reason"]
    assert joined == whole["text"]


# --- (2) disconnects ----------------------------------------------------------------------------------


def test_a_stream_dropped_midway_stops_its_row_and_others_are_unaffected(srv):
    other_alone = ok(srv.url, "gen", "the bystander", max_new_tokens=120)[0]["text"]
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") == 0, 30)
    cancelled = metric(srv.url, "frozenlm_cancelled_rows_total")
    pool, [other] = background(lambda i: ok(srv.url, "gen", "the bystander", max_new_tokens=120))
    with httpx.stream("POST", f"{srv.url}/tasks/gen/infer", headers=ADMIN, timeout=120,
                      json={"inputs": "drop me", "stream": True, "parameters": {"max_new_tokens": 1000}}) as r:
        for event, _ in sse_events(r):
            break  # one piece, then hang up
    assert other.result()[0]["text"] == other_alone
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") == 0, 60)
    assert wait_for(lambda: metric(srv.url, "frozenlm_cancelled_rows_total") > cancelled, 30)
    assert_ready(srv.url)
    pool.shutdown()


def test_a_non_streamed_request_dropped_midway_stops_its_rows(srv):
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") == 0, 30)
    cancelled = metric(srv.url, "frozenlm_cancelled_rows_total")
    with pytest.raises(httpx.ReadTimeout):
        infer(srv.url, "gen", ["drop a", "drop b", "drop c"], timeout=0.3, max_new_tokens=1000)
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") == 0, 60)
    assert wait_for(lambda: metric(srv.url, "frozenlm_cancelled_rows_total") >= cancelled + 3, 30)
    assert ok(srv.url, "sst2", "fine")[0]["label"] in ("negative", "positive")


# --- (4) hot-swap and the prefix cache ------------------------------------------------------------------


def test_hot_swap_keeps_the_running_version_and_never_reuses_its_prefix_cache(srv, ref, arts):
    text = "a stormy night on the coast"
    old_alone = ok(ref.url, "v1", text, max_new_tokens=LONG)[0]["text"]
    new_alone = ok(ref.url, "v2", text, max_new_tokens=LONG)[0]["text"]
    short_new = ok(ref.url, "v2", "short", max_new_tokens=20)[0]["text"]
    assert old_alone != new_alone
    _put(srv.url, "swap", arts["v1"])
    ok(srv.url, "swap", "short", max_new_tokens=20)  # warms v1's prefix blocks of the long template
    pool, [running] = background(lambda i: infer(srv.url, "swap", text, max_new_tokens=LONG))
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") >= 1, 30)
    _put(srv.url, "swap", arts["v2"])
    assert ok(srv.url, "swap", text, max_new_tokens=LONG)[0]["text"] == new_alone
    assert ok(srv.url, "swap", "short", max_new_tokens=20)[0]["text"] == short_new
    r = running.result()
    assert r.status_code == 200 and r.json()["outputs"][0]["text"] == old_alone
    assert r.json()["version"] != infer(srv.url, "swap", "x", max_new_tokens=1).json()["version"]
    pool.shutdown()


# --- (6) concurrent mixed requests equal the same requests alone ------------------------------------------


def _mixed():
    reqs = []
    for i in range(24):
        k = i % 6
        if k == 0:
            reqs.append(("sst2", f"a great film number {i}", {}))
        elif k == 1:
            reqs.append(("gen", f"question {i}", {"max_new_tokens": 20 + 7 * i}))
        elif k == 2:
            reqs.append(("gen", f"pick one {i}", {"choices": ["yes", "no", "maybe"]}))
        elif k == 3:
            reqs.append(("gen", f"sample {i}", {"max_new_tokens": 40, "temperature": 0.9, "seed": i}))
        elif k == 4:
            reqs.append(("v1", f"story {i}" * (i % 5 + 1), {"max_new_tokens": 60}))
        else:
            reqs.append(("sst2", [f"row {i}", f"another row {i}"], {}))
    return reqs


def _key(outputs):
    return [(o["text"], o.get("label"), tuple(round(s, 4) for s in o["scores"].values()) if o.get("scores") else None)
            for o in outputs]


def test_concurrent_mixed_requests_equal_the_same_requests_alone(srv):
    reqs = _mixed()
    alone = [_key(ok(srv.url, t, x, **p)) for t, x, p in reqs]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: _key(ok(srv.url, r[0], r[1], **r[2])), reqs))
    for r, a, b in zip(reqs, alone, together):
        assert a == b, r


def test_concurrent_mixed_requests_equal_a_server_with_a_small_kv_budget(srv, ref):
    reqs = _mixed()
    with ThreadPoolExecutor(6) as pool:
        here = list(pool.map(lambda r: _key(ok(srv.url, r[0], r[1], **r[2])), reqs))
    there = [_key(ok(ref.url, t, x, **p)) for t, x, p in reqs]
    for r, a, b in zip(reqs, here, there):
        assert a == b, r


# --- (5) a small KV budget -----------------------------------------------------------------------------


def test_small_kv_budget_many_long_requests_all_answer_without_stalling(ref):
    def call(i):
        r = infer(ref.url, "gen", "x" * (100 + 13 * i), timeout=150, max_new_tokens=400)
        return r.status_code, r.json()
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 429}, results
    assert codes.count(200) >= 8
    assert_ready(ref.url)
    assert wait_for(lambda: metric(ref.url, "frozenlm_running_rows") == 0, 30)


def test_a_row_over_the_kv_budget_runs_alone(ref):
    # 1500 prompt tokens + 1000 new: 8 slots x 4096 columns > 4096, so it never fits beside others
    r = infer(ref.url, "gen", "y" * 1500, timeout=150, max_new_tokens=1000)
    assert r.status_code == 200, r.text
    assert_ready(ref.url)


# --- (7) memory ---------------------------------------------------------------------------------------


def test_memory_of_50_concurrent_long_prompts_is_bounded(srv):
    def attack():
        with ThreadPoolExecutor(50) as pool:
            codes = list(pool.map(lambda i: infer(srv.url, "gen", "z" * 2000 + str(i), timeout=200,
                                                  max_new_tokens=4).status_code, range(50)))
        assert set(codes) <= {200, 429}, codes
        assert 200 in codes

    assert peak_growth_mb(srv.pid, attack) < 500
    assert_ready(srv.url)


# --- (3) the deadline ---------------------------------------------------------------------------------


def test_deadline_gives_504_and_the_server_stays_healthy(tiny_served, tmp_path_factory, arts):
    root = tmp_path_factory.mktemp("deadline")
    with served(_env(tiny_served[0], request_timeout_s=1), root / "store") as s:
        _put(s.url, "gen", arts["gen"])
        _put(s.url, "sst2", arts["sst2"])
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda i: infer(s.url, "gen", ["w" * 1500] * 4, max_new_tokens=1000).status_code,
                                  range(6)))
        assert set(codes) == {504}, codes
        assert wait_for(lambda: metric(s.url, "frozenlm_running_rows") == 0, 60)
        assert metric(s.url, "frozenlm_cancelled_rows_total") >= 20  # most of the 24 rows stopped, not run out
        pool = ThreadPoolExecutor(2)
        busy = [pool.submit(infer, s.url, "gen", ["w" * 1500] * 4, max_new_tokens=1000) for _ in range(2)]
        events = []
        with httpx.stream("POST", f"{s.url}/tasks/gen/infer", headers=ADMIN, timeout=60,
                          json={"inputs": "late", "stream": True, "parameters": {"max_new_tokens": 1000}}) as r:
            assert r.status_code == 200
            events = [e for e, _ in sse_events(r)]
        assert events[-1] == "error" and "done" not in events, events[-3:]
        assert [f.result().status_code for f in busy] == [504, 504]
        pool.shutdown()
        assert wait_for(lambda: metric(s.url, "frozenlm_running_rows") == 0, 60)
        assert_ready(s.url)
        assert ok(s.url, "sst2", "still fine")[0]["label"] in ("negative", "positive")


# --- (8) the static engine ----------------------------------------------------------------------------


def test_static_engine_still_answers(tiny_served, tmp_path_factory, arts, ref):
    root = tmp_path_factory.mktemp("static")
    reqs = _mixed()[:12]
    there = [_key(ok(ref.url, t, x, **p)) for t, x, p in reqs]
    with served(_env(tiny_served[0], engine="static"), root / "store") as s:
        for name in ("sst2", "gen", "v1"):
            _put(s.url, name, arts[name])
        with ThreadPoolExecutor(4) as pool:
            here = list(pool.map(lambda r: _key(ok(s.url, r[0], r[1], **r[2])), reqs))
        for r, a, b in zip(reqs, here, there):
            assert a == b, r


def test_a_deleted_and_reuploaded_task_serves_the_new_module(srv, ref):
    text = "a stormy night on the coast"
    new_alone = ok(ref.url, "v2", text, max_new_tokens=200)[0]["text"]
    _put(srv.url, "dx", (arts := _modules_cache())["v1"])
    old = ok(srv.url, "dx", text, max_new_tokens=200)[0]["text"]
    assert old != new_alone
    assert httpx.delete(f"{srv.url}/tasks/dx", headers=ADMIN, timeout=30).status_code == 204
    _put(srv.url, "dx", arts["v2"])
    assert ok(srv.url, "dx", text, max_new_tokens=200)[0]["text"] == new_alone


@pytest.mark.parametrize("stop", [["OOO"], ["ab", "\n\n"], ["xyzzy-never"]])
def test_streamed_multi_character_stops_add_up(srv, stop):
    for i in range(4):
        params = {"max_new_tokens": 200, "temperature": 1.2, "seed": 100 + i, "stop": stop}
        whole = ok(srv.url, "gen", f"stops {i}", **params)[0]
        joined, done = _stream_text(srv.url, "gen", f"stops {i}", params)
        assert joined == whole["text"] == done["text"], (joined, whole)


def _staggered():
    reqs = []
    for i in range(36):
        n_prompt = [5, 40, 300, 900, 17, 120][i % 6] + i
        text = ("abcdefghij" * 100)[:n_prompt] + str(i)
        task = ["gen", "v1", "gen", "v2"][i % 4]
        # (500 new tokens met a float32 near-tie here: top-2 logits 2.4e-7 apart, so batched and alone
        # may pick differently; kept at 100)
        params = {"max_new_tokens": [3, 250, 60, 100, 1, 120][(i // 2) % 6]}
        inputs = [text, text[::-1]] if i % 5 == 0 else text
        reqs.append((task, inputs, params, 0.05 * (i % 7)))
    return reqs


def test_staggered_joins_and_leaves_equal_each_request_alone(srv):
    reqs = _staggered()
    alone = [_key(ok(srv.url, t, x, **p)) for t, x, p, _ in reqs]

    def call(r):
        time.sleep(r[3])
        return _key(ok(srv.url, r[0], r[1], **r[2]))

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(call, reqs))
    bad = [(r[:3], a, b) for r, a, b in zip(reqs, alone, together) if a != b]
    assert not bad, f"{len(bad)} of {len(reqs)} differ; first: {bad[0]}"


def test_a_task_deleted_while_it_generates_finishes_with_its_module(srv, ref):
    text = "a stormy night on the coast"
    old_alone = ok(ref.url, "v1", text, max_new_tokens=LONG)[0]["text"]
    _put(srv.url, "gone", _modules_cache()["v1"])
    pool, [running] = background(lambda i: infer(srv.url, "gone", text, max_new_tokens=LONG))
    assert wait_for(lambda: metric(srv.url, "frozenlm_running_rows") >= 1, 30)
    assert httpx.delete(f"{srv.url}/tasks/gone", headers=ADMIN, timeout=30).status_code == 204
    assert infer(srv.url, "gone", text, max_new_tokens=2).status_code == 404
    r = running.result()
    assert r.status_code == 200 and r.json()["outputs"][0]["text"] == old_alone
    pool.shutdown()


def test_extreme_budgets_one_kv_token_one_prefill_token_tiny_prefix_cache(tiny_served, tmp_path_factory, ref, arts):
    reqs = [r[:3] for r in _staggered()[:18]]
    there = [_key(ok(ref.url, t, x, **p)) for t, x, p in reqs]
    root = tmp_path_factory.mktemp("extreme")
    with served(_env(tiny_served[0], kv_tokens=1, prefill_tokens=1, prefix_cache_tokens=8), root / "store") as s:
        for name in ("gen", "v1", "v2"):
            _put(s.url, name, arts[name])
        with ThreadPoolExecutor(8) as pool:
            here = list(pool.map(lambda r: _key(ok(s.url, r[0], r[1], **r[2])), reqs))
        bad = [(r, a, b) for r, a, b in zip(reqs, here, there) if a != b]
        assert not bad, f"{len(bad)} differ; first: {bad[0]}"
        assert_ready(s.url)


def _one_pass_beside(url, rows):
    """Start `rows` long generation rows, then a classification request: whether it was answered
    before any of the long rows' requests finished."""
    texts = [f"long row {i}" for i in range(rows + 24)]
    outs = ok(url, "gen", texts, max_new_tokens=LONG)
    texts = [t for t, o in zip(texts, outs) if o["finish_reason"] == "length"][:rows]  # no early EOS
    assert len(texts) == rows
    pool = ThreadPoolExecutor(rows)
    longs = [pool.submit(long_gen, url, "gen", t, LONG) for t in texts]
    assert wait_for(lambda: metric(url, "frozenlm_running_rows") >= rows, 60)
    out = ok(url, "sst2", "a quick one")
    early = not any(f.done() for f in longs)
    assert [f.result().status_code for f in longs] == [200] * rows
    pool.shutdown()
    assert out[0]["label"] in ("negative", "positive")
    return early


def test_a_one_pass_request_beside_a_few_long_generations_waits_one_step(srv):
    assert _one_pass_beside(srv.url, 4)


def test_a_one_pass_request_beside_a_full_running_batch_waits_one_step(srv):
    """Scoring rows never enter the running batch: a full one (max_batch_size rows) does not hold them back."""
    assert _one_pass_beside(srv.url, 32)


def test_a_cancelled_job_that_does_not_fit_does_not_hold_back_the_queue(tiny_served, tmp_path_factory, arts):
    """A job whose client went away leaves the queue's head at once (counted as cancelled), so a job
    that could never fit beside the running rows does not block the ones behind it."""
    root = tmp_path_factory.mktemp("headofline")
    with served(_env(tiny_served[0], kv_tokens=8192), root / "store") as s:
        for name in ("gen", "sst2"):
            _put(s.url, name, arts[name])
        texts = [f"long row {i}" for i in range(24)]
        outs = ok(s.url, "gen", texts, max_new_tokens=LONG)
        texts = [t for t, o in zip(texts, outs) if o["finish_reason"] == "length"][:8]  # 8 slots x 1024 columns
        with ThreadPoolExecutor(1) as pool:
            longs = pool.submit(infer, s.url, "gen", texts, max_new_tokens=LONG)
            assert wait_for(lambda: metric(s.url, "frozenlm_running_rows") >= len(texts), 30)
            # 1500 + 1000 tokens never fit beside them; its client hangs up at once
            with httpx.stream("POST", f"{s.url}/tasks/gen/infer", headers=ADMIN, timeout=30,
                              json={"inputs": "y" * 1500, "stream": True, "parameters": {"max_new_tokens": LONG}}) as r:
                assert r.status_code == 200
            time.sleep(0.3)
            out = ok(s.url, "sst2", "quick")
            early = not longs.done()
            assert longs.result().status_code == 200
        assert out[0]["label"] in ("negative", "positive")
        assert early
