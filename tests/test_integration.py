"""End to end on the embedded SmolLM2 backbone: a real uvicorn server on a free loopback port,
the real client over HTTP, the shipped example task, and real SST-2 rows."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from clients import Client, Conflict, InvalidRequest, NotFound, Unauthorized
from tests.conftest import INTEGRATION_ADMIN_KEY

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent / "data"  # small slices of public data sets; see data/README.md
SST2_DEV = DATA / "sst2" / "stsa.binary.dev.head200"
SST2_TEMPLATE = "Review: {input}\nSentiment:"
SST2_LABELS = {"negative": " negative", "positive": " positive"}


def _sst2_rows(n: int) -> list[tuple[str, str]]:
    rows = []
    for line in SST2_DEV.read_text().splitlines()[:n]:
        y, x = line.split(" ", 1)
        rows.append((x, "positive" if y == "1" else "negative"))
    return rows


def test_ready_and_base_answers_real_text(admin, real_backbone):
    assert admin.backbone()["fingerprint"] == real_backbone.info.fingerprint
    out = admin.infer("base", "What is the capital of France?")
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop" and out.usage["completion_tokens"] > 2


def test_the_example_task_is_installed_and_classifies(admin):
    tasks = {t.name: t for t in admin.list_tasks()}
    assert "sst2" in tasks and tasks["sst2"].kind == "prompt" and tasks["sst2"].status == "ready"
    assert tasks["sst2"].metrics["eval_accuracy"] > 0.8
    out = admin.infer("sst2", ["a gorgeous , witty , deeply moving film .",
                               "a dull , lifeless and tedious mess ."]).outputs
    assert [o.label for o in out] == ["positive", "negative"]
    assert all(abs(sum(o.scores.values()) - 1) < 1e-4 for o in out)


def test_the_idpt_example_answers_p3_prompts_in_a_batch_with_other_tasks(server, admin):
    """p3-idpt (kind idpt) is installed and answers P3 prompts; concurrent requests of it, sst2 and
    base share batches and give the answers each gets alone."""
    task = {t.name: t for t in admin.list_tasks()}["p3-idpt"]
    assert task.kind == "idpt" and task.status == "ready"
    rows = [json.loads(line) for line in (DATA / "p3" / "ag_news_classify_with_choices.every40.jsonl").read_text().splitlines()]
    options = {"Business", "Science and technology", "World politics", "Sports"}
    answers = [admin.infer("p3-idpt", r["prompt"], max_new_tokens=8).outputs[0].text.strip() for r in rows]
    assert all(a in options for a in answers), answers  # the task's answer format, learned from the mix
    jobs = [("p3-idpt", r["prompt"]) for r in rows] + [("sst2", "a gorgeous film"), ("base", "Hello!")]
    alone = [admin.infer(n, t, max_new_tokens=8).outputs[0].text for n, t in jobs]

    def call(job):
        with Client(server[0], api_key=INTEGRATION_ADMIN_KEY, timeout=300) as c:
            return c.infer(job[0], job[1], max_new_tokens=8).outputs[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(call, jobs)) == alone


def test_trained_example_beats_zero_shot_on_sst2_dev_over_http(admin, real_backbone):
    from modules.registry import kind_class

    zero_shot = kind_class("template").new(real_backbone, template=SST2_TEMPLATE, labels=SST2_LABELS)
    admin.upload("sst2-zero-shot", zero_shot.to_artifact())
    rows = _sst2_rows(200)
    acc = {}
    for task in ("sst2", "sst2-zero-shot"):
        labels = []
        for i in range(0, len(rows), 50):
            labels += [o.label for o in admin.infer(task, [x for x, _ in rows[i:i + 50]]).outputs]
        acc[task] = sum(p == y for p, (_, y) in zip(labels, rows)) / len(rows)
    print("SST-2 dev[:200] accuracy over HTTP:", acc)
    assert acc["sst2"] >= acc["sst2-zero-shot"] + 0.03


def _random_prompt(backbone, p: int, seed: int) -> bytes:
    from modules.registry import kind_class

    m = kind_class("prompt").new(backbone, {"num_virtual_tokens": p, "seed": seed}, template="{input}")
    return m.to_artifact()


def _random_deltas(backbone) -> list[bytes]:
    from modules.registry import kind_class

    specs = [("lora", {"targets": ["q_proj", "v_proj"], "r": 8}), ("lora", {"targets": ["gate_proj", "down_proj"], "r": 2}),
             ("prefix", {"num_virtual_tokens": 3}), ("prefix", {"num_virtual_tokens": 12}),
             ("compose", {"parts": [{"kind": "lora", "config": {"r": 4}}, {"kind": "prompt", "config": {}}]}),
             ("idpt", {"num_virtual_tokens": 6}), ("recursive", {"feed": "prepend", "pass2_prompt_tokens": 4})]
    out = []
    for i, (kind, cfg) in enumerate(specs):
        m = kind_class(kind).new(backbone, cfg, template="{input}")
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(m.to_artifact())
    return out


PROMPTS = ["Write one word:", "List three colors, please, and explain why you like them.", "Hello!",
           "Translate to French: good morning", "What is 2+2?", "Name a large animal that lives in the sea."]


def test_mixed_task_batch_equals_each_request_alone_in_the_engine(real_backbone):
    """Base, 4 prompt, 2 LoRA, 2 prefix, 1 composed, 1 idpt and 1 recursive module, rows of different
    lengths in one batch (probes batched too), against each row alone."""
    from modules.core.artifact import read_artifact
    from modules.core.decode import GenItem, Sampling
    from modules.core.running import generate
    from modules.core.stages import prepare
    from modules.kinds.base import NoModule
    from modules.registry import load_module

    mods = [NoModule(real_backbone)] + [load_module(read_artifact(_random_prompt(real_backbone, p, p)), real_backbone)
                                       for p in (1, 4, 8, 20)]
    mods += [load_module(read_artifact(blob), real_backbone) for blob in _random_deltas(real_backbone)]
    pairs = [(mods[i % len(mods)], text) for i, text in enumerate(PROMPTS * 3)]
    with torch.inference_mode():
        batched = prepare(real_backbone, [(m, m.encode(t)) for m, t in pairs])
        single = [prepare(real_backbone, [(m, m.encode(t))])[0] for m, t in pairs]
    item = lambda r: GenItem(r.ids, r.contribution, Sampling(max_new_tokens=10))  # noqa: E731
    together = generate(real_backbone, [item(r) for r in batched])
    alone = [generate(real_backbone, [item(r)])[0] for r in single]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    assert len({g.text for g in together}) >= 8


def test_concurrent_requests_of_many_tasks_match_sequential_answers(server, admin, real_backbone):
    names = []
    for p in (2, 5, 11, 16):
        name = f"mix-{p}"
        admin.upload(name, _random_prompt(real_backbone, p, seed=p))
        names.append(name)
    for name, blob in zip(("mix-idpt", "mix-recursive"), _random_deltas(real_backbone)[-2:]):
        admin.upload(name, blob)
        names.append(name)
    names.append("base")
    jobs = [(names[i % len(names)], text) for i, text in enumerate(PROMPTS * 2)]
    params = {"max_new_tokens": 8, "temperature": 0}
    alone = [admin.infer(n, t, **params).outputs[0].text for n, t in jobs]

    def call(job):
        with Client(server[0], timeout=300) as c:
            return c.infer(job[0], job[1], **params).outputs[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(call, jobs))
    assert together == alone
    with Client(server[0]) as c:
        batches = c._http.get("/metrics").text
    rows = [line for line in batches.splitlines() if line.startswith("frozenlm_batch_rows_bucket")]
    single = next(float(line.split()[-1]) for line in rows if 'le="1.0"' in line)
    total = next(float(line.split()[-1]) for line in rows if 'le="+Inf"' in line)
    assert total > single  # some batches really held several rows


def test_upload_replace_delete_through_the_client(admin, real_backbone, server):
    art = _random_prompt(real_backbone, 3, seed=1)
    up = admin.upload("life-cycle", art)
    assert up.version == 1 and up.kind == "prompt"
    assert admin.upload("life-cycle", _random_prompt(real_backbone, 6, seed=2)).version == 2
    assert admin.get_task("life-cycle").raw["manifest"]["config"]["num_virtual_tokens"] == 6
    admin.delete("life-cycle")
    with pytest.raises(NotFound):
        admin.infer("life-cycle", "x")
    with Client(server[0]) as anonymous, pytest.raises(Unauthorized):
        anonymous.upload("life-cycle", art)


def test_bad_input_answers_clearly_and_leaves_the_store_alone(admin, server):
    store = server[1]
    before = sorted((p.name, p.stat().st_size) for p in store.rglob("*") if p.is_file())
    with pytest.raises(NotFound) as e:
        admin.infer("no-such-task", "x")
    assert e.value.status == 404 and e.value.code == "task_not_found"
    with pytest.raises(InvalidRequest) as e:
        admin.infer("base", "x", max_new_tokens=0)
    assert e.value.status == 422
    with pytest.raises(InvalidRequest) as e:
        admin.infer("base", "word " * 600)
    assert e.value.status == 413 and e.value.code == "input_too_long"
    with pytest.raises(InvalidRequest) as e:
        admin.upload("broken", b"PK\x03\x04 this is not really a zip")
    assert e.value.status == 422
    with pytest.raises(Conflict):
        admin.upload("base", b"anything")
    after = sorted((p.name, p.stat().st_size) for p in store.rglob("*") if p.is_file())
    assert after == before
    raw = admin._http.post("/tasks/base/infer", content=b"{oops", headers={"Content-Type": "application/json"})
    assert raw.status_code == 422 and json.loads(raw.text)["error"]["code"] == "invalid_request"


def test_new_version_mid_traffic_each_answer_matches_its_version(server, admin, real_backbone):
    import threading

    text, params = "Name a color.", {"max_new_tokens": 6, "temperature": 0}
    admin.upload("swap", _random_prompt(real_backbone, 4, seed=101))
    expected = {1: admin.infer("swap", text, **params).outputs[0].text}
    answers, errors, stop = [], [], threading.Event()

    def traffic():
        with Client(server[0], timeout=300) as c:
            while not stop.is_set():
                try:
                    r = c.infer("swap", text, **params)
                    answers.append((r.version, r.outputs[0].text))
                except Exception as e:  # noqa: BLE001 - every failure is a test failure
                    errors.append(e)

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    while len(answers) < 8:
        time.sleep(0.05)
    up = admin.upload("swap", _random_prompt(real_backbone, 9, seed=202))
    n = len(answers)
    while len(answers) < n + 8:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    expected[2] = admin.infer("swap", text, **params).outputs[0].text
    assert up.version == 2 and expected[1] != expected[2]
    assert not errors
    assert {v for v, _ in answers} == {1, 2}
    assert all(out == expected[v] for v, out in answers)


def test_streaming_over_http_returns_the_plain_text(server, admin):
    import httpx

    body = {"inputs": "Write a short greeting.", "parameters": {"max_new_tokens": 16}}
    plain = admin.infer("base", body["inputs"], **body["parameters"]).outputs[0].text
    pieces, done = [], None
    with httpx.stream("POST", f"{server[0]}/tasks/base/infer", json={**body, "stream": True}, timeout=120) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:])
                if event == "done":
                    done = data
                else:
                    pieces.append(data["text"])
    assert len(pieces) > 3 and "".join(pieces) == plain == done["outputs"][0]["text"]


def test_the_openai_package_works_unchanged(server, admin):
    from openai import OpenAI

    from tests.conftest import INTEGRATION_ADMIN_KEY

    client = OpenAI(base_url=f"{server[0]}/v1", api_key=INTEGRATION_ADMIN_KEY, max_retries=0)
    ids = [m.id for m in client.models.list()]
    assert "base" in ids and "sst2" in ids

    text = "Name the largest planet."
    done = client.completions.create(model="base", prompt=text, max_tokens=12, temperature=0)
    assert done.choices[0].text == admin.infer("base", text, max_new_tokens=12).outputs[0].text
    assert done.usage.completion_tokens > 0

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="base", messages=msgs, max_tokens=20, temperature=0)
    answer = chat.choices[0].message.content
    assert "Paris" in answer and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="base", messages=msgs, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == answer

    label = client.completions.create(model="sst2", prompt="a gorgeous , witty , deeply moving film .")
    assert label.choices[0].text == "positive"
