"""Several samples per prompt (`parameters.n`, OpenAI `n`): the n samples share one prefill (counted
in backbone positions), sample i equals the single request seeded seed + i (alone, batched, or
joining a running batch), the queue counts n rows, and /infer, the OpenAI package, the Python
client and the CLI answer n outputs."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from modules.core.batch import Row
from modules.core.decode import GenItem, Sampling
from modules.core.running import RunningBatch, generate
from modules.kinds.base import NoModule
from modules.registry import kind_class
from service.app import create_app
from service.config import Settings
from service.continuous import ContinuousEngine
from service.engine import Engine
from service.errors import Overloaded, TooLarge
from service.scheduler import Job, Scheduler
from tests.test_batching import _modules, _rows


class PrefillCounter:
    """Counts the positions the backbone computes in prefill passes (passes of more than one new
    position per row; decode steps compute one), by wrapping `forward` on the instance."""

    def __init__(self, backbone, monkeypatch):
        self.positions = self.passes = 0
        forward = backbone.forward

        def counting(embeds, mask, positions, cache=None, deltas=None):
            if embeds.shape[1] > 1:
                self.positions += int(mask[:, -embeds.shape[1]:].sum())
                self.passes += 1
            return forward(embeds, mask, positions, cache, deltas)

        monkeypatch.setattr(backbone, "forward", counting)

    def reset(self) -> None:
        self.positions = self.passes = 0


def _samples(row, sampling: Sampling, n: int) -> list[GenItem]:
    return [GenItem(row.ids, row.contribution, sampling.for_sample(i)) for i in range(n)]


def _single(row, sampling: Sampling, i: int) -> GenItem:
    """What a request seeded seed + i, alone, would run."""
    return GenItem(row.ids, row.contribution, Sampling(**{**sampling.__dict__, "seed": sampling.seed + i}))


def test_n_samples_share_one_prefill_and_sample_i_is_seed_plus_i(tiny, monkeypatch):
    """Eight samples of a prompt, for a base row, a soft prompt, a prefix, a LoRA and a composed
    module: the backbone computes the prompt's positions once (eight separate rows: eight times),
    and sample i has the tokens (and logprobs) of the same prompt run alone with seed + i."""
    mods = _modules(tiny)
    chosen = [mods[0], mods[2], mods[6], mods[4], mods[8]]  # base, prompt(4), prefix(3), lora, compose
    rows = _rows(tiny, [(m, "the quick brown fox") for m in chosen])
    sampling = Sampling(max_new_tokens=12, temperature=1.0, top_k=50, seed=21, logprobs=2, ignore_eos=True)
    counter = PrefillCounter(tiny, monkeypatch)
    for row in rows:
        positions = len(Row(row.ids, row.contribution))  # its virtual tokens and ids
        counter.reset()
        shared = generate(tiny, [_samples(row, sampling, 8)])[0]
        assert (counter.passes, counter.positions) == (1, positions)
        counter.reset()
        separate = generate(tiny, [_single(row, sampling, i) for i in range(8)])
        assert counter.positions == 8 * positions
        assert len({tuple(g.token_ids) for g in shared}) == 8  # eight different streams
        for g, s in zip(shared, separate):
            assert g.token_ids == s.token_ids and g.text == s.text
            assert [e.id for e in g.logprobs] == [e.id for e in s.logprobs]
            assert max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs, s.logprobs)) <= 1e-5


def test_samples_joining_a_running_batch_mid_decode_equal_their_single_requests(tiny):
    mods = _modules(tiny)
    others = [GenItem(r.ids, r.contribution, Sampling(max_new_tokens=9))
              for r in _rows(tiny, [(mods[i], t) for i, t in ((1, "a"), (3, "hello there"), (5, "zz top"))])]
    row = _rows(tiny, [(mods[7], "mixed batches")])[0]
    sampling = Sampling(max_new_tokens=10, temperature=0.9, seed=100)
    samples = _samples(row, sampling, 5)
    batch, done = RunningBatch(tiny, slots=2), {}
    batch.join(others)
    for step in range(40):
        if step == 3:
            batch.join_samples(samples)
        done.update({id(it): g for it, g in batch.step()})
    assert not len(batch) and len(done) == 8
    for i, s in enumerate(samples):
        assert done[id(s)].token_ids == generate(tiny, [_single(row, sampling, i)])[0].token_ids
    for it in others:
        assert done[id(it)].token_ids == generate(tiny, [it])[0].token_ids


def test_join_samples_refuses_samples_of_different_prompts(tiny):
    row, other = _rows(tiny, [(NoModule(tiny), "a"), (NoModule(tiny), "b")])
    with pytest.raises(ValueError, match="samples of one prompt"):
        RunningBatch(tiny).join_samples([GenItem(row.ids, row.contribution, Sampling()),
                                         GenItem(other.ids, row.contribution, Sampling())])


# --- engines and the queue -----------------------------------------------------------------------


@pytest.mark.parametrize("engine_class", [ContinuousEngine, Engine])
def test_both_engines_answer_a_job_of_n_samples_with_each_seed(tiny, engine_class):
    base, prompt = _modules(tiny)[0], _modules(tiny)[2]
    sampling = Sampling(max_new_tokens=8, temperature=1.0, seed=9)

    def job(module, text, n, seed=9):
        return Job(module, module.encode(text), Sampling(**{**sampling.__dict__, "seed": seed}), 30, n=n)

    singles = [job(prompt, "hello", 1, seed=9 + i) for i in range(4)] + [job(base, "other", 1)]
    jobs = [job(prompt, "hello", 4), job(base, "other", 1), job(base, "unseeded", 3, seed=None)]
    engine = engine_class(tiny, Scheduler())
    engine.start()
    try:
        engine.scheduler.submit(singles)
        engine.scheduler.submit(jobs)
        got = [j.future.result(timeout=120) for j in jobs]
        alone = [j.future.result(timeout=120) for j in singles]
    finally:
        engine.stop()
    assert [g.token_ids for g in got[0]] == [a.token_ids for a in alone[:4]]
    assert got[1].token_ids == alone[4].token_ids  # n = 1 answers one Generated, as before
    assert isinstance(got[2], list) and len({tuple(g.token_ids) for g in got[2]}) == 3  # its own seed, + i


def test_the_queue_counts_a_jobs_n_rows(tiny):
    base = NoModule(tiny)

    def job(n):
        return Job(base, [1, 2], Sampling(max_new_tokens=4), 10, n=n)

    s = Scheduler(max_queue=8)
    s.submit([job(5)])
    assert s.depth == 5
    with pytest.raises(Overloaded):
        s.submit([job(4)])
    s.submit([job(3)])
    with pytest.raises(TooLarge, match="9 rows"):
        Scheduler(max_queue=8).submit([job(9)])
    assert [j.n for j in s.next_batch(rows=6)] == [5]  # 5 + 3 rows are more than 6: the second waits


# --- /infer in-process ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory, tiny):
    settings = Settings(store_dir=tmp_path_factory.mktemp("store"), examples=False, max_input_tokens=64,
                        max_new_tokens=32, max_queue=8, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as client:
        labels = kind_class("prompt").new(tiny, {"num_virtual_tokens": 2}, labels={"a": " a", "b": " b"})
        assert client.put("/tasks/cls", content=labels.to_artifact()).status_code == 201
        yield client


def _infer(client, inputs, **params):
    r = client.post("/tasks/base/infer", json={"inputs": inputs, "parameters": params})
    assert r.status_code == 200, r.text
    return r.json()


def test_infer_answers_n_outputs_per_input_input_by_input(app_client):
    params = {"max_new_tokens": 6, "temperature": 1.0, "seed": 40}
    got = _infer(app_client, ["hello", "zz top"], n=3, **params)
    assert len(got["outputs"]) == 6
    for k, text in enumerate(["hello", "zz top"]):
        for i in range(3):
            alone = _infer(app_client, text, **{**params, "seed": 40 + i})["outputs"][0]
            assert got["outputs"][3 * k + i]["text"] == alone["text"]
    singles = [_infer(app_client, t, **{**params, "seed": 40 + i}) for t in ("hello", "zz top") for i in range(3)]
    assert got["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert got["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"] + singles[3]["usage"]["prompt_tokens"]


@pytest.mark.parametrize("path, body, named", [
    ("/tasks/base/infer", {"inputs": "x", "parameters": {"n": 0}}, "parameters.n"),
    ("/tasks/base/infer", {"inputs": "x", "parameters": {"n": 17}}, "parameters.n"),
    ("/tasks/base/infer", {"inputs": "x", "parameters": {"n": 2.5}}, "parameters.n"),
    ("/v1/completions", {"model": "base", "prompt": "x", "n": 17}, "n"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
])
def test_bad_n_is_422_naming_it(app_client, path, body, named):
    r = app_client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"].startswith(f"{named}:")


def test_n_on_a_label_scoring_request_is_422_and_n_rows_count_in_the_queue(app_client):
    for task, params in (("cls", {"n": 2}), ("base", {"n": 3, "choices": [" yes", " no"]})):
        r = app_client.post(f"/tasks/{task}/infer", json={"inputs": "x", "parameters": params})
        assert r.status_code == 422 and r.json()["error"]["message"].startswith("n:"), r.text
    assert app_client.post("/tasks/cls/infer", json={"inputs": "x", "parameters": {"n": 1}}).status_code == 200
    r = app_client.post("/tasks/base/infer", json={"inputs": ["a", "b", "c"], "parameters": {"n": 3}})
    assert r.status_code == 413 and "9 rows" in r.json()["error"]["message"]  # the queue holds 8


# --- a real server: streaming, the openai package, the client, the CLI ---------------------------


@pytest.fixture(scope="module")
def served_tiny(tiny_served, tmp_path_factory):
    from tests.adversary import served

    env = {"FROZENLM_BACKBONE": str(tiny_served[0]), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_THREADS": "1"}
    with served(env, tmp_path_factory.mktemp("n-store")) as s:
        yield s.url


def _texts(url, text, seeds, **params):
    return [httpx.post(f"{url}/tasks/base/infer", timeout=60, json={"inputs": text, "parameters": {
        **params, "seed": s}}).json()["outputs"][0]["text"] for s in seeds]


def test_infer_streams_n_samples_with_their_index(served_tiny):
    from tests.test_continuous_http import sse_events

    params = {"max_new_tokens": 10, "temperature": 1.0, "seed": 3}
    want = _texts(served_tiny, "stream n", [3, 4, 5], max_new_tokens=10, temperature=1.0)
    texts, done = ["", "", ""], None
    with httpx.stream("POST", f"{served_tiny}/tasks/base/infer", timeout=60,
                      json={"inputs": "stream n", "stream": True, "parameters": {**params, "n": 3}}) as r:
        for event, data in sse_events(r):
            if event == "done":
                done = json.loads(data)
            else:
                piece = json.loads(data)
                texts[piece["index"]] += piece["text"]
    assert texts == want == [o["text"] for o in done["outputs"]]


def test_the_openai_package_gets_n_choices(served_tiny):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served_tiny}/v1", api_key="none", max_retries=0)
    want = _texts(served_tiny, "hi", [7, 8, 9], max_new_tokens=8, temperature=1.0)
    done = client.completions.create(model="base", prompt="hi", max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in done.choices] == [0, 1, 2] and [c.text for c in done.choices] == want
    two = client.completions.create(model="base", prompt=["hi", "hi"], max_tokens=8, temperature=1.0, seed=7, n=3)
    assert [c.index for c in two.choices] == list(range(6)) and [c.text for c in two.choices] == want * 2

    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=1.0, seed=1, n=2,
                                          logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.logprobs.content for c in chat.choices)
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    stream = client.chat.completions.create(model="base", messages=msgs, max_tokens=8, temperature=1.0, seed=1, n=2,
                                            stream=True)
    texts, finish = ["", ""], [None, None]
    for chunk in stream:
        c = chunk.choices[0]
        texts[c.index] += c.delta.content or ""
        finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [c.message.content for c in chat.choices]
    assert finish == [c.finish_reason for c in chat.choices]


def test_the_client_and_the_cli_take_n(served_tiny, capsys):
    from clients import Client
    from clients.cli import main as cli

    want = _texts(served_tiny, "hello", [11, 12], max_new_tokens=6, temperature=1.0)
    with Client(served_tiny) as c:
        res = c.infer("base", ["hello", "hello"], max_new_tokens=6, temperature=1.0, seed=11, n=2)
    assert [[o.text for o in group] for group in res.samples(2)] == [want, want]
    assert cli(["--url", served_tiny, "infer", "base", "hello", "--max-new-tokens", "6", "--temperature", "1",
                "--seed", "11", "-n", "2", "--json"]) == 0
    assert [o["text"] for o in json.loads(capsys.readouterr().out)["outputs"]] == want
    assert cli(["--url", served_tiny, "infer", "base", "hello", "-n", "17"]) == 1
    assert "parameters.n" in capsys.readouterr().err


# --- the real backbone ---------------------------------------------------------------------------


@pytest.mark.integration
def test_real_backbone_n_samples_share_one_prefill(real_backbone, monkeypatch):
    """SmolLM2, a LoRA task: four samples of a chat prompt are one prefill of its positions, and
    sample i is the prompt alone with seed + i."""
    bb = real_backbone
    lora = kind_class("lora").new(bb, {"targets": ["q_proj", "v_proj"], "r": 4, "seed": 2}, chat=True)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.02)
    ids = lora.encode("Write one sentence about the sea.")
    row = _rows(bb, [(lora, "Write one sentence about the sea.")])[0]
    assert row.ids == ids
    sampling = Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=2024, logprobs=1)
    counter = PrefillCounter(bb, monkeypatch)
    shared = generate(bb, [_samples(row, sampling, 4)])[0]
    assert (counter.passes, counter.positions) == (1, len(ids))
    separate = [generate(bb, [_single(row, sampling, i)])[0] for i in range(4)]
    assert counter.positions == 5 * len(ids)
    assert [g.text for g in shared] == [s.text for s in separate] and len({g.text for g in shared}) > 1
    for g, s in zip(shared, separate):
        assert max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs, s.logprobs)) <= 1e-4


@pytest.mark.integration
def test_real_server_openai_chat_with_n_and_logprobs(server, admin):
    """The embedded backbone behind a real server: the openai package's chat with n = 2 and
    top_logprobs; choice i is the /infer request seeded seed + i, and its tokens' bytes are its text."""
    from openai import OpenAI

    from tests.conftest import INTEGRATION_ADMIN_KEY

    client = OpenAI(base_url=f"{server[0]}/v1", api_key=INTEGRATION_ADMIN_KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Name a fruit and its color."}]
    chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=12, temperature=0.9, seed=40, n=2,
                                          logprobs=True, top_logprobs=2)
    assert [c.index for c in chat.choices] == [0, 1]
    for i, c in enumerate(chat.choices):
        alone = admin.infer("base", "Name a fruit and its color.", max_new_tokens=12, temperature=0.9, seed=40 + i,
                            logprobs=2).outputs[0]
        assert c.message.content == alone.text
        assert [t.token for t in c.logprobs.content] == [t.token for t in alone.logprobs]
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        # no stop string: the tokens' bytes are the text (EOS is in neither)
        assert b"".join(bytes(t.bytes) for t in c.logprobs.content).decode("utf-8", "replace") == c.message.content
