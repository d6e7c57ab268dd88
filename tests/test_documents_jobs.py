"""Documents indexed in the background (issue 18, part 4): stored at once with their BM25 index,
dense vectors computed by a job in bounded steps through the scheduler, the last complete index
answering meanwhile, a restart that resumes the job, the client and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from modules.core.retrieval import Document, Retriever
from modules.registry import kind_class
from service.documents import Documents, Indexing
from service.store import ModuleStore
from tests.test_documents import CORPUS, _artifact, _jsonl, _rows

ADMIN = {"Authorization": "Bearer jobs-admin"}
JSONL = {"content-type": "application/x-ndjson"}


def _rrr_artifact(bb, **config) -> bytes:
    cfg = {"candidates": 3, "context_tokens": 100, "reader_prompt_tokens": 2, "rerank_passage_tokens": 32, **config}
    return kind_class("rrr").new(bb, cfg).to_artifact()


def _many(n: int, words: int = 12) -> list[Document]:
    """n distinct passages (different lengths), a few sharing rare words with the queries below."""
    vocab = ["zebra", "river", "castle", "bread", "comet", "violin", "harbour", "orchard", "glacier", "lantern"]
    return [Document(f"d{i}", " ".join(vocab[(i * 7 + j) % len(vocab)] + str(i % (j + 2)) for j in range(words + i % 9)),
                     f"Title {i}") for i in range(n)]


# --- the store and its jobs, in process --------------------------------------------------------


class _Gate:
    """The backbone's lock, as the test holds it (the backbone is busy); `waiting` is set when an
    indexing step asks for it."""

    def __init__(self):
        self.lock, self.waiting = threading.Lock(), threading.Event()

    def __enter__(self):
        self.waiting.set()
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_bm25_answers_at_once_and_the_last_complete_index_while_a_new_one_builds(tiny, tmp_path):
    """While the backbone is busy (the test holds its lock) no indexing step runs: the documents
    are stored and BM25 answers at once; dense searches answer from the last complete index, or
    wait (503 `documents_indexing`) when there is none; newer documents supersede a running job,
    whose vectors the next one reuses."""
    gate = _Gate()
    lock = gate.lock
    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    docs = Documents(modules, tiny, gate, needs_dense=lambda task: True, step_tokens=64)
    docs.start()
    with lock:
        job = docs.add("kb", _jsonl(_rows(CORPUS[:4])))
        assert job.dense and job.status in ("queued", "running") and job.count == 4
        assert [d.id for d in docs.list("kb")[1]] == ["paris", "quagga", "tea", "volcano"]
        assert docs.search("kb", "extinct plains zebra", 1, "bm25")[0][0].id == "quagga"
        for method in ("dense", "hybrid"):
            with pytest.raises(Indexing, match=f"job {job.id}") as e:
                docs.view("kb", method)
            assert e.value.status == 503 and e.value.headers["Retry-After"]
    first = docs.wait("kb", job.id)
    assert (first.status, first.done, first.total) == ("done", 4, 4)
    assert len(docs.view("kb", "hybrid")) == 4

    with lock:
        gate.waiting.clear()
        second = docs.add("kb", _jsonl(_rows(CORPUS[4:])))
        assert len(docs.view("kb", "bm25")) == 8       # the newest documents, by BM25 at once
        assert len(docs.view("kb", "hybrid")) == 4     # the last complete dense index
        assert gate.waiting.wait(60)                   # the second job's first step waits for the backbone
        third = docs.add("kb", _jsonl(_rows([Document("x", "A xylophone is a musical instrument.")])))
        assert docs.job("kb", second.id).status == "superseded"
        assert docs.job("kb", second.id).superseded_by == third.id
    last = docs.wait("kb", second.id)  # follows superseded_by
    assert last.id == third.id and last.status == "done"
    # the second job had embedded one document (the step it waited in) when it was superseded: reused
    assert (last.total, last.resumed, last.done) == (5, 1, 5)
    assert len(docs.view("kb", "hybrid")) == 9
    reference = Retriever(tiny, progress=False).build([*CORPUS, Document("x", "A xylophone is a musical instrument.")])
    np.testing.assert_allclose(docs.view("kb", "dense").generation.retriever.vectors(), reference.vectors(), atol=1e-5)
    assert [j.id for j in docs.jobs("kb")] == [third.id, second.id, job.id]
    docs.stop()


class _Scheduler:
    """Runs each submitted job at once, recording it; answers 429 to the first submit."""

    depth = 0  # nothing else waits

    def __init__(self):
        self.jobs, self.refused = [], 0

    def submit(self, jobs):
        from service.errors import Overloaded

        if not self.refused:
            self.refused += 1
            raise Overloaded("queue is full")
        for j in jobs:
            self.jobs.append(j)
            j.future.set_result(j.work())


def test_indexing_steps_are_bounded_queued_and_equal_to_embedding_at_once(tiny, tmp_path):
    """Every step is one queued backbone pass of at most `step_tokens` tokens (or one document),
    a full queue is retried, and the vectors are those of embedding every document at once."""
    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    scheduler = _Scheduler()
    docs = Documents(modules, tiny, scheduler=scheduler, needs_dense=lambda task: True, step_tokens=200)
    docs.start()
    many = _many(40)
    job = docs.wait("kb", docs.add("kb", _jsonl(_rows(many))).id)
    assert (job.status, job.done, job.total) == ("done", 40, 40)
    tok = tiny.tokenizer
    lengths = [min(len(tok(d.passage, add_special_tokens=False)["input_ids"]), 256) for d in many]
    costs = [j.cost for j in scheduler.jobs]
    assert scheduler.refused == 1 and all(j.task == "kb" and j.module is None for j in scheduler.jobs)
    assert sum(costs) == sum(lengths)
    assert all(c <= 200 for c in costs) and len(costs) >= -(-sum(lengths) // 200)
    reference = Retriever(tiny, progress=False).build(many)
    np.testing.assert_allclose(docs.view("kb", "dense").generation.retriever.vectors(), reference.vectors(), atol=1e-5)
    for method in ("dense", "hybrid"):
        assert [d.id for d, _ in docs.search("kb", "zebra3 river1", 5, method)] == \
            [i for i, _ in reference.search("zebra3 river1", 5, method)]
    docs.stop()


def test_an_indexing_step_is_queued_only_when_no_request_waits():
    """Passes waits while the scheduler's queue holds requests, so a request that arrives during a
    step is not also queued behind the next one (and waits `yield_s` at most, so indexing goes on
    under constant load)."""
    from service.documents.jobs import Passes

    class Queue(_Scheduler):
        looks = 0

        @property
        def depth(self):
            Queue.looks += 1
            return 0 if Queue.looks > 5 else 3  # requests wait during the first five looks

    q = Queue()
    q.refused = 1  # no 429 here
    assert Passes(q, yield_s=600).run(lambda: "ran", 7, "kb") == "ran"
    assert Queue.looks == 6 and [j.cost for j in q.jobs] == [7]
    Queue.looks = -10**9  # requests always wait: queued anyway once yield_s has passed
    assert Passes(q, yield_s=0).run(lambda: "ran again", 1, "kb") == "ran again"


def test_a_task_that_needs_no_dense_vectors_never_computes_them(tiny, tmp_path, monkeypatch):
    import modules.core.retrieval as retrieval

    calls = []
    monkeypatch.setattr(retrieval, "embed_texts", lambda *a, **kw: calls.append(a) or pytest.fail("embedded"))
    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    docs = Documents(modules, tiny, needs_dense=lambda task: False)
    docs.start()
    job = docs.add("kb", _jsonl(_rows(CORPUS)))
    assert (job.status, job.dense, job.total) == ("done", False, 0)
    assert docs.search("kb", "extinct plains zebra", 1, "bm25")[0][0].id == "quagga"
    assert not calls and not (tmp_path / "kb" / "documents" / "partial.safetensors").exists()
    docs.stop()


def test_a_store_written_before_jobs_existed_loads_without_embedding(tiny, tmp_path, monkeypatch):
    """current.json in its first form ({"generation", "count", "stamp"}, one index folder with dense
    vectors): loaded as it is, dense searches answer at once, the next write moves to the new form."""
    import modules.core.retrieval as retrieval

    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    folder = tmp_path / "kb" / "documents"
    folder.mkdir()
    (folder / "docs-3.jsonl").write_bytes(_jsonl(_rows(CORPUS)))
    reference = Retriever(tiny, progress=False).build(CORPUS)
    reference.save(folder / "index-3")
    (folder / "current.json").write_text(json.dumps({"generation": 3, "count": len(CORPUS), "stamp": "old"}))
    real = retrieval.embed_texts
    monkeypatch.setattr(retrieval, "embed_texts", lambda bb, texts, *a, **kw: pytest.fail("embedded documents")
                        if len(texts) > 1 else real(bb, texts, *a, **kw))  # a query only
    docs = Documents(modules, tiny, needs_dense=lambda task: True)
    docs.start()
    assert docs.list("kb")[0] == len(CORPUS) and not docs.jobs("kb")
    assert [d.id for d, _ in docs.search("kb", "zebra", 3, "dense")] == [i for i, _ in reference.search("zebra", 3, "dense")]
    job = docs.add("kb", _jsonl(_rows([CORPUS[0]])))  # unchanged: every vector known
    assert job.status == "done" and job.generation == 4
    pointer = json.loads((folder / "current.json").read_text())
    assert pointer["latest"]["generation"] == 4 and pointer["dense"] == pointer["latest"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["current.json", "docs-4.jsonl", pointer["latest"]["index"], "jobs"])
    docs.stop()


# --- through the runtime (in process) -----------------------------------------------------------


def _app(tmp_path, tiny, **settings):
    from service.app import create_app
    from service.config import Settings

    return create_app(Settings(store_dir=tmp_path, examples=False, _env_file=None, **settings), backbone=tiny,
                      wait_ready=True)


def test_a_dense_task_waits_for_its_first_index_while_other_tasks_answer(tmp_path, tiny):
    """One document per step: while a long job runs, another task's requests are answered (they
    wait for one step at most, never for the job); a hybrid rrr task waits for its first index
    (503 `documents_indexing` past the request deadline) and then answers from it."""
    from fastapi.testclient import TestClient

    app = _app(tmp_path, tiny, prefill_tokens=1, request_timeout_s=1.0)
    with TestClient(app) as c:
        rt = app.state.runtime
        assert c.put("/tasks/qa", content=_rrr_artifact(tiny, retrieval="hybrid")).status_code == 201
        assert c.put("/tasks/other", content=_artifact(tiny)).status_code == 201
        with rt.backbone_lock:  # the engine cannot run a step: no document is embedded
            r = c.post("/tasks/qa/documents", content=_jsonl(_rows(_many(300, words=6))), headers=JSONL)
            assert r.status_code == 202 and r.json()["job"]["dense"]
            job_id = r.json()["job"]["id"]
            hits = c.get("/tasks/qa/documents/search", params={"q": "zebra3", "method": "bm25"}).json()["results"]
            assert hits and all(h["id"].startswith("d") for h in hits)  # BM25 at once
            late = c.post("/tasks/qa/infer", json={"inputs": "zebra3 river1", "parameters": {"max_new_tokens": 2}})
            assert late.status_code == 503 and late.json()["error"]["code"] == "documents_indexing"
            assert job_id in late.json()["error"]["message"] and late.headers["retry-after"]
        answers = [c.post("/tasks/other/infer", json={"inputs": f"hi {i}", "parameters": {"max_new_tokens": 3}})
                   for i in range(3)]
        job = c.get(f"/tasks/qa/documents/jobs/{job_id}").json()
        assert all(a.status_code == 200 for a in answers)
        assert job["status"] == "running" and job["done"] < job["total"] == 300, job  # answered during the job
    # shut down meanwhile: the job stopped after its step and saved what it had computed
    app = _app(tmp_path, tiny, prefill_tokens=64)
    with TestClient(app) as c:  # restarted: the job resumes and the task answers once it is done
        out = c.post("/tasks/qa/infer", json={"inputs": "zebra3 river1", "parameters": {"max_new_tokens": 2}})
        assert out.status_code == 200, out.text
        assert out.json()["outputs"][0]["passages"]
        job = c.get(f"/tasks/qa/documents/jobs/{job_id}").json()
        assert job["status"] == "done" and job["done"] == job["total"] == 300 and job["resumed"] > 0


def test_a_new_module_version_that_retrieves_densely_indexes_the_documents(tmp_path, tiny):
    from fastapi.testclient import TestClient

    app = _app(tmp_path, tiny)
    with TestClient(app) as c:
        assert c.put("/tasks/qa", content=_rrr_artifact(tiny, retrieval="bm25")).status_code == 201
        assert c.post("/tasks/qa/documents", content=_jsonl(_rows(CORPUS)), headers=JSONL).json()["job"]["dense"] is False
        assert [j["dense"] for j in c.get("/tasks/qa/documents/jobs").json()["jobs"]] == [False]
        assert c.put("/tasks/qa", content=_rrr_artifact(tiny, retrieval="dense")).status_code == 201
        newest = c.get("/tasks/qa/documents/jobs").json()["jobs"][0]
        assert newest["dense"] and newest["count"] == len(CORPUS)
        out = c.post("/tasks/qa/infer", json={"inputs": "Which zebra is extinct?", "parameters": {"max_new_tokens": 2}})
        dense = Retriever(tiny, progress=False).build(CORPUS).search("Which zebra is extinct?", 3, "dense")
        assert out.status_code == 200  # a new module keeps the retriever's order: the dense one's
        assert [p["id"] for p in out.json()["outputs"][0]["passages"]] == [i for i, _ in dense]
        assert c.get(f"/tasks/qa/documents/jobs/{newest['id']}").json()["status"] == "done"


# --- a real server: the restart, the client and the CLI -----------------------------------------


def _env(folder):
    return {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
            "FROZENLM_ADMIN_KEY": "jobs-admin", "FROZENLM_MAX_UPLOAD_BYTES": str(8 << 20)}


def test_a_restart_during_indexing_resumes_the_job_and_loses_no_document(tiny_served, tmp_path):
    """kill -9 while a job embeds (one document per step), start again: the same job resumes
    from the vectors it had saved and finishes; every document is there and searchable."""
    from tests.adversary import served

    folder, bb = tiny_served
    env = {**_env(folder), "FROZENLM_PREFILL_TOKENS": "1"}
    many = _many(300, words=6)
    with served(env, tmp_path) as s, httpx.Client(base_url=s.url, headers=ADMIN, timeout=120) as c:
        assert c.put("/tasks/qa", content=_rrr_artifact(bb, retrieval="hybrid")).status_code == 201
        r = c.post("/tasks/qa/documents", content=_jsonl(_rows(many)), headers=JSONL)
        assert r.status_code == 202
        job_id = r.json()["job"]["id"]
        while (job := c.get(f"/tasks/qa/documents/jobs/{job_id}").json())["done"] < 80:  # saved at 64
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.02)
        os.kill(s.pid, signal.SIGKILL)
        os.waitpid(s.pid, 0)
    record = json.loads((tmp_path / "qa" / "documents" / "jobs" / f"{job_id}.json").read_text())
    assert record["status"] == "queued"  # it never finished
    assert (tmp_path / "qa" / "documents" / "partial.safetensors").exists()
    with served({**env, "FROZENLM_PREFILL_TOKENS": "512"}, tmp_path) as s:
        from clients import Client

        with Client(s.url, api_key="jobs-admin") as c:
            job = c.wait_documents("qa", job_id, poll=0.1)
            assert (job.id, job.status, job.done, job.total) == (job_id, "done", 300, 300)
            assert job.raw["resumed"] >= 64  # saved before the kill: not embedded again
            listed = c.list_documents("qa", limit=1000)
            assert listed["count"] == 300 and [d["id"] for d in listed["documents"]] == [d.id for d in many]
            reference = Retriever(bb, progress=False).build(many)
            hits = c.search_documents("qa", "zebra3 river1 castle2", k=5, method="dense")
            assert [h["id"] for h in hits] == [i for i, _ in reference.search("zebra3 river1 castle2", 5, "dense")]
            assert c.infer("qa", "zebra3 river1", max_new_tokens=2).outputs[0].passages


@pytest.fixture(scope="module")
def tiny_server(tiny_served, tmp_path_factory):
    from tests.adversary import served

    folder, bb = tiny_served
    with served(_env(folder), tmp_path_factory.mktemp("jobs-store")) as s:
        assert httpx.put(f"{s.url}/tasks/qa", content=_rrr_artifact(bb, retrieval="hybrid"),
                         headers=ADMIN).status_code == 201
        yield s, bb


def test_the_client_adds_follows_searches_and_deletes(tiny_server, tmp_path):
    from clients import AsyncClient, Client, NotFound

    s, bb = tiny_server
    seen = []
    with Client(s.url, api_key="jobs-admin") as c:
        job = c.add_documents("qa", [{"id": d.id, "text": d.text, "title": d.title} for d in CORPUS], wait=True,
                              on_progress=seen.append)
        assert (job.status, job.dense, job.count, job.done, job.total) == ("done", True, len(CORPUS), 8, 8)
        assert seen[-1] == job and seen[0].id == job.id
        assert c.documents_job("qa", job.id) == job
        path = tmp_path / "more.jsonl"
        path.write_bytes(_jsonl([{"id": "tea", "text": "Green tea.", "title": "Tea"}]))
        job = c.add_documents("qa", path, wait=True)
        assert (job.added, job.replaced, job.count, job.total) == (0, 1, len(CORPUS), 1)  # only tea is new
        assert c.get_document("qa", "tea")["text"] == "Green tea."
        reference = Retriever(bb, progress=False).build([*CORPUS[:2], Document("tea", "Green tea.", "Tea"), *CORPUS[3:]])
        for method in ("bm25", "dense", "hybrid"):
            hits = c.search_documents("qa", "green tea leaves", k=3, method=method)
            assert [h["id"] for h in hits] == [i for i, _ in reference.search("green tea leaves", 3, method)]

    async def run():
        async with AsyncClient(s.url, api_key="jobs-admin") as a:
            job = await a.add_documents("qa", _jsonl(_rows([Document("new", "A brand new passage.")])), wait=True)
            page = await a.list_documents("qa", limit=1000)
            hits = await a.search_documents("qa", "brand new passage", k=1, method="bm25")
            await a.delete_documents("qa")
            return job, page, hits, await a.list_documents("qa")

    job, page, hits, empty = asyncio.run(run())
    assert job.status == "done" and job.count == len(CORPUS) + 1 and page["count"] == len(CORPUS) + 1
    assert hits[0]["id"] == "new" and empty["count"] == 0
    with Client(s.url, api_key="jobs-admin") as c, pytest.raises(NotFound):
        c.documents_job("qa", job.id)  # its jobs went with its documents


def test_the_cli_adds_documents_with_a_progress_bar_following_the_job(tiny_server, tmp_path):
    s, _ = tiny_server
    path = tmp_path / "docs.jsonl"
    path.write_bytes(_jsonl(_rows(_many(60))))
    env = {**os.environ, "FROZENLM_URL": s.url, "FROZENLM_API_KEY": "jobs-admin"}
    run = subprocess.run([sys.executable, "-m", "clients.cli", "documents", "add", "qa", str(path), "--poll", "0.05"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "stored 60 documents of qa (60 added, 0 replaced)" in run.stderr
    assert "indexing" in run.stderr and "60/60" in run.stderr  # the bar, at its end
    assert "indexed: 60 documents, dense vectors computed" in run.stdout
    listed = subprocess.run([sys.executable, "-m", "clients.cli", "documents", "list", "qa", "--limit", "2"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert [json.loads(x)["id"] for x in listed.stdout.splitlines()] == ["d0", "d1"]
    found = subprocess.run([sys.executable, "-m", "clients.cli", "documents", "search", "qa", "zebra0", "-k", "2",
                            "--method", "bm25"], capture_output=True, text=True, env=env, timeout=60)
    assert found.returncode == 0 and len(found.stdout.splitlines()) == 2
    bad = path.with_name("bad.jsonl")
    bad.write_text('{"id": "a", "text": ""}\n')
    refused = subprocess.run([sys.executable, "-m", "clients.cli", "documents", "add", "qa", str(bad)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "422 invalid_document" in refused.stderr and "line 1" in refused.stderr


# --- on the real backbone ------------------------------------------------------------------------


@pytest.mark.integration
def test_documents_indexed_in_the_background_on_the_real_backbone(admin, real_backbone):
    """Warsaw's paragraphs posted to a hybrid rrr task: the job's vectors, computed step by step
    through the engine, equal embedding them at once; the task answers from them, and other tasks
    answer while the job runs."""
    from concurrent.futures import ThreadPoolExecutor

    from modules.core.artifact import pack, read_artifact
    from modules.core.retrieval import DOCUMENTS_FILE, VECTORS_FILE
    from tests.test_rrr import EXAMPLE, SQUAD

    files = {k: v for k, v in read_artifact(EXAMPLE.read_bytes()).items() if k not in (DOCUMENTS_FILE, VECTORS_FILE)}
    manifest = json.loads(files["module.json"])
    manifest["config"]["retrieval"] = "hybrid"
    files["module.json"] = json.dumps(manifest).encode()
    admin.upload("warsaw-rrr", pack(files))
    article = json.loads(SQUAD.read_text())["data"][0]
    docs = [Document(f"warsaw-{i}", p["context"], "Warsaw") for i, p in enumerate(article["paragraphs"])]
    assert len(docs) >= 10
    job = admin.add_documents("warsaw-rrr", docs)
    assert job.dense and job.count == len(docs)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(admin.infer, "sst2", "a gorgeous film")
        done = admin.wait_documents("warsaw-rrr", job.id, poll=0.2)
        assert other.result().outputs[0].label == "positive"
    assert (done.status, done.done, done.total) == ("done", len(docs), len(docs))
    reference = Retriever(real_backbone, progress=False).build(docs)
    question = article["paragraphs"][0]["qas"][0]["question"]
    hits = admin.search_documents("warsaw-rrr", question, k=5, method="dense")
    expected = reference.search(question, 5, "dense")
    assert [h["id"] for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h["score"] for h in hits], [s for _, s in expected], atol=1e-4)
    out = admin.infer("warsaw-rrr", question, max_new_tokens=8).outputs[0]
    assert out.passages and {p["id"] for p in out.passages} <= {d.id for d in docs}
