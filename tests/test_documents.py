"""Documents per task (HTTP, a real server on the tiny model) and retrieval (Retriever, directly)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from modules.core.retrieval import Document, Retriever, embed_texts, words
from modules.registry import kind_class
from tests.conftest import tiny_backbone

ADMIN = {"Authorization": "Bearer docs-admin"}
JSONL = {"content-type": "application/x-ndjson"}

CORPUS = [
    Document("paris", "Paris is the capital and largest city of France, on the Seine.", "Paris"),
    Document("quagga", "The quagga is an extinct subspecies of plains zebra that lived in South Africa.", "Quagga"),
    Document("tea", "Tea is an aromatic beverage prepared by pouring hot water over cured leaves.", "Tea"),
    Document("volcano", "A volcano is a rupture in the crust where lava, ash and gases escape.", None),
    Document("chess", "Chess is a board game for two players, each moving sixteen pieces.", "Chess"),
    Document("otter", "Sea otters float on their backs and use stones to crack open shellfish.", "Sea otter"),
    Document("bread", "Bread is a staple food made from flour and water, usually baked.", "Bread"),
    Document("comet", "A comet is an icy body that warms and releases gas near the Sun.", "Comet"),
]


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _rows(docs):
    return [{"id": d.id, "text": d.text, **({"title": d.title} if d.title else {})} for d in docs]


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes()) for p in root.rglob("*") if p.is_file())


def _artifact(bb) -> bytes:
    return kind_class("prompt").new(bb, {"num_virtual_tokens": 2}, template="Q: {input}\nA:").to_artifact()


# --- over HTTP ---------------------------------------------------------------------------------


def _env(folder, store):
    return {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(store), "FROZENLM_EXAMPLES": "false",
            "FROZENLM_ADMIN_KEY": "docs-admin", "FROZENLM_MAX_UPLOAD_BYTES": "20000", "FROZENLM_DEVICE": "cpu"}


@pytest.fixture(scope="module")
def served(tiny_served, tmp_path_factory):
    """A real server on the tiny model with one task `kb`."""
    from tests.server import running_server

    folder, bb = tiny_served
    store = tmp_path_factory.mktemp("doc-store")
    with running_server(_env(folder, store)) as url:
        with httpx.Client(base_url=url, headers=ADMIN, timeout=120) as c:
            assert c.put("/tasks/kb", content=_artifact(bb)).status_code == 201
            yield c, store


def test_upload_list_get_replace_delete(served):
    c, store = served
    r = c.post("/tasks/kb/documents", content=_jsonl(_rows(CORPUS)), headers=JSONL)
    assert r.status_code == 202, r.text
    body = r.json()
    assert {k: body[k] for k in ("task", "added", "replaced", "count")} == {
        "task": "kb", "added": len(CORPUS), "replaced": 0, "count": len(CORPUS)}
    job = body["job"]  # a prompt task needs no dense vectors: BM25 was all, done at once
    assert (job["status"], job["dense"], job["count"], job["generation"]) == ("done", False, len(CORPUS), 1)
    assert r.headers["location"] == f"/tasks/kb/documents/jobs/{job['id']}"
    assert c.get(r.headers["location"]).json() == job

    page = c.get("/tasks/kb/documents", params={"offset": 2, "limit": 3}).json()
    assert page["count"] == len(CORPUS) and (page["offset"], page["limit"]) == (2, 3)
    assert [d["id"] for d in page["documents"]] == ["tea", "volcano", "chess"]
    assert c.get("/tasks/kb/documents/volcano").json() == {"id": "volcano", "text": CORPUS[3].text, "title": None}

    # the same id again replaces it in place; a new id (with a slash) is appended
    more = [{"id": "tea", "text": "Tea, replaced.", "title": "Tea 2"}, {"id": "wiki/Rome", "text": "Rome is in Italy."}]
    r = c.post("/tasks/kb/documents", content=_jsonl(more), headers={"content-type": "application/jsonl; charset=utf-8"})
    assert {k: r.json()[k] for k in ("added", "replaced", "count")} == {"added": 1, "replaced": 1, "count": len(CORPUS) + 1}
    ids = [d["id"] for d in c.get("/tasks/kb/documents", params={"limit": 1000}).json()["documents"]]
    assert ids == [d.id for d in CORPUS] + ["wiki/Rome"]
    assert c.get("/tasks/kb/documents/tea").json()["text"] == "Tea, replaced."
    assert c.get("/tasks/kb/documents/wiki/Rome").json()["text"] == "Rome is in Italy."

    hits = c.get("/tasks/kb/documents/search", params={"q": "extinct zebra subspecies", "k": 3, "method": "bm25"}).json()
    assert hits["method"] == "bm25" and hits["results"][0]["id"] == "quagga" and hits["results"][0]["title"] == "Quagga"
    assert hits["results"][0]["score"] > 0
    for method in ("dense", "hybrid"):  # the first starts their indexing and waits for it
        res = c.get("/tasks/kb/documents/search", params={"q": "zebra", "k": 4, "method": method}).json()["results"]
        assert len(res) == 4 and [h["score"] for h in res] == sorted((h["score"] for h in res), reverse=True)
    jobs = c.get("/tasks/kb/documents/jobs").json()["jobs"]
    assert [(j["status"], j["dense"], j["generation"]) for j in jobs] == [("done", True, 2), ("done", False, 2),
                                                                         ("done", False, 1)]
    assert jobs[0]["done"] == jobs[0]["total"] == len(CORPUS) + 1  # a search asked: every document embedded
    assert c.get("/tasks/kb/documents/jobs/nope").json()["error"]["code"] == "job_not_found"

    assert c.get("/tasks/kb/documents/nope").json()["error"]["code"] == "document_not_found"
    assert c.delete("/tasks/kb/documents").status_code == 204
    assert c.get("/tasks/kb/documents").json()["count"] == 0
    assert c.get("/tasks/kb/documents/search", params={"q": "zebra"}).json()["results"] == []
    assert not (store / "kb" / "documents").exists()


@pytest.mark.parametrize("body,status,code,where", [
    (b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "ok"\n', 422, "invalid_document", "line 2"),
    (b'{"id": "a", "text": "ok"}\n\n{"id": "b", "text": ""}\n', 422, "invalid_document", "line 3"),
    (b'{"id": "a", "text": "   "}\n', 422, "invalid_document", "line 1"),
    (b'{"id": "a", "text": "ok"}\n{"id": "a", "text": "again"}\n', 422, "duplicate_id", "line 2"),
    (b'{"id": "a", "text": "ok", "extra": 1}\n', 422, "invalid_document", "extra"),
    (b'{"text": "no id"}\n', 422, "invalid_document", "id"),
    (b'["a", "list"]\n', 422, "invalid_document", "line 1"),
    (b'{"id": "a", "text": "\xff\xfe"}\n', 422, "invalid_document", "UTF-8"),
    (b'{"id": "search", "text": "ok"}\n', 422, "invalid_document", "reserved"),
    (b'{"id": "jobs/1", "text": "ok"}\n', 422, "invalid_document", "reserved"),
    (b"\n\n", 422, "invalid_request", "no documents"),
    (_jsonl([{"id": f"d{i}", "text": "x" * 100} for i in range(300)]), 413, "body_too_large", "limit"),
])
def test_a_refused_upload_stores_nothing(served, body, status, code, where):
    c, store = served
    assert c.post("/tasks/kb/documents", content=_jsonl([{"id": "keep", "text": "kept"}]), headers=JSONL).status_code == 202
    before = _snapshot(store)
    r = c.post("/tasks/kb/documents", content=body, headers=JSONL)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and where in r.json()["error"]["message"]
    assert _snapshot(store) == before
    assert c.get("/tasks/kb/documents").json()["count"] == 1
    c.delete("/tasks/kb/documents")


def test_unknown_task_media_type_and_keys(served):
    c, _ = served
    one = _jsonl([{"id": "a", "text": "ok"}])
    assert c.post("/tasks/ghost/documents", content=one, headers=JSONL).json()["error"]["code"] == "task_not_found"
    assert c.get("/tasks/ghost/documents").status_code == 404
    assert c.get("/tasks/base/documents/search", params={"q": "x"}).status_code == 404
    r = c.post("/tasks/kb/documents", content=one, headers={"content-type": "application/json"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert c.get("/tasks/kb/documents/search", params={"q": "x", "method": "magic"}).status_code == 422
    assert c.get("/tasks/kb/documents/search", params={"q": "x", "k": 0}).status_code == 422
    anon = {"Authorization": ""}
    assert c.post("/tasks/kb/documents", content=one, headers={**JSONL, **anon}).status_code == 401
    assert c.delete("/tasks/kb/documents", headers=anon).status_code == 401
    assert c.get("/tasks/kb/documents", headers=anon).status_code == 401
    assert c.get("/tasks/kb/documents", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_documents_and_search_survive_a_restart_and_go_with_their_task(tiny_served, tmp_path):
    from tests.server import running_server

    folder, bb = tiny_served
    env = _env(folder, tmp_path)
    queries = [("extinct zebra", "bm25"), ("capital of France", "dense"), ("icy body near the Sun", "hybrid")]
    with running_server(env) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=120) as c:
        assert c.put("/tasks/kb", content=_artifact(bb)).status_code == 201
        assert c.post("/tasks/kb/documents", content=_jsonl(_rows(CORPUS)), headers=JSONL).status_code == 202
        listed = c.get("/tasks/kb/documents").json()
        found = [c.get("/tasks/kb/documents/search", params={"q": q, "k": 5, "method": m}).json() for q, m in queries]
    assert found[0]["results"][0]["id"] == "quagga"
    with running_server(env) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=120) as c:
        assert c.get("/tasks/kb/documents").json() == listed
        again = [c.get("/tasks/kb/documents/search", params={"q": q, "k": 5, "method": m}).json() for q, m in queries]
        assert again == found
        # a new version of the module keeps the documents; deleting the task takes them
        assert c.put("/tasks/kb", content=_artifact(bb)).json()["version"] == 2
        assert c.get("/tasks/kb/documents").json()["count"] == len(CORPUS)
        assert c.delete("/tasks/kb").status_code == 204
        assert c.get("/tasks/kb/documents").status_code == 404
        assert c.put("/tasks/kb", content=_artifact(bb)).status_code == 201
        assert c.get("/tasks/kb/documents").json()["count"] == 0
    assert not (tmp_path / "kb" / "documents").exists()


def test_embedding_waits_for_the_engine_and_the_engine_for_embedding(tmp_path, tiny):
    """Backbone passes never overlap: the engine holds the runtime's backbone lock per batch."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    settings = Settings(store_dir=tmp_path, examples=False, _env_file=None)
    app = create_app(settings, backbone=tiny, wait_ready=True)
    with TestClient(app) as client:
        rt = app.state.runtime
        assert rt.documents.lock is rt.backbone_lock
        done = threading.Event()

        def infer():
            client.post("/tasks/base/infer", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
            done.set()

        with rt.backbone_lock:  # what an embedding batch holds
            t = threading.Thread(target=infer)
            t.start()
            assert not done.wait(1.0)  # the engine waits for the lock
        assert done.wait(30)
        t.join()


def test_a_dense_search_is_a_job_in_the_queue(tmp_path, tiny, monkeypatch):
    """A dense or hybrid search's backbone pass waits in the scheduler's queue like any other work:
    a full queue answers 429; bm25 needs no backbone and still answers."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings
    from service.scheduler import Job, Scheduler

    settings = Settings(store_dir=tmp_path, examples=False, max_queue=2, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        assert c.put("/tasks/kb", content=_artifact(tiny)).status_code == 201
        assert c.post("/tasks/kb/documents", content=_jsonl(_rows(CORPUS)), headers=JSONL).status_code == 202
        dense = c.get("/tasks/kb/documents/search", params={"q": "a zebra", "k": 3, "method": "dense"})
        assert dense.status_code == 200 and len(dense.json()["results"]) == 3
    monkeypatch.setattr(Scheduler, "next_batch", lambda self, *a, **k: time.sleep(0.01) or [])  # now nothing leaves the queue
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        c.app.state.runtime.scheduler.submit([Job(None, [], None, 1) for _ in range(2)])
        for method in ("dense", "hybrid"):
            r = c.get("/tasks/kb/documents/search", params={"q": "a zebra", "method": method})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        r = c.get("/tasks/kb/documents/search", params={"q": "zebra", "method": "bm25"})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == "quagga"


# --- the retriever -----------------------------------------------------------------------------


def test_words_is_lowercase_unicode_word_runs():
    assert words("Rhône-Alpes, in the 1960s: DON'T") == ["rhône", "alpes", "in", "the", "1960s", "don", "t"]


def test_bm25_ranks_the_document_sharing_rare_words_first():
    r = Retriever().build(CORPUS)  # no backbone: BM25 only
    for query, expected in [("extinct plains zebra", "quagga"), ("otters crack shellfish with stones", "otter"),
                            ("What is the CAPITAL of France?", "paris"), ("lava and ash", "volcano")]:
        hits = r.search(query, k=3, method="bm25")
        assert hits[0][0] == expected, (query, hits)
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert r.search("xylophone", k=3, method="bm25") == []  # shares no word with any document
    with pytest.raises(ValueError, match="dense index"):
        r.search("zebra", method="dense")


def test_dense_and_hybrid_return_k_results_sorted(tiny):
    r = Retriever(tiny, progress=False).build(CORPUS)
    for method in ("dense", "hybrid"):
        for k in (1, 5, 50):
            hits = r.search("a zebra in Africa", k=k, method=method)
            assert len(hits) == min(k, len(CORPUS))
            assert len({i for i, _ in hits}) == len(hits)
            scores = [s for _, s in hits]
            assert scores == sorted(scores, reverse=True)
    cos = [s for _, s in r.search("a zebra", k=len(CORPUS), method="dense")]
    assert all(-1.0001 <= s <= 1.0001 for s in cos)
    # hybrid = reciprocal-rank fusion (k=60): the top score is at most 2/61, reached by a document first in both
    top = r.search("extinct plains zebra quagga", k=1, method="hybrid")[0]
    assert top[1] <= 2 / 61 + 1e-12
    with pytest.raises(ValueError, match="unknown retrieval method"):
        r.search("x", method="sparse")


def test_a_text_is_embedded_the_same_alone_and_in_a_batch(tiny):
    texts = [d.passage for d in CORPUS] + ["x"]
    together = embed_texts(tiny, texts, batch_size=3, progress=False)  # (N, H)
    alone = np.stack([embed_texts(tiny, [t], progress=False)[0] for t in texts])
    assert together.shape == (len(texts), tiny.hidden_size) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert not np.allclose(together[0], together[1])
    cut = embed_texts(tiny, [texts[0], texts[0][:8]], max_tokens=8, progress=False)
    np.testing.assert_allclose(cut[0], cut[1], atol=1e-5)  # the byte-level tiny tokenizer: 8 chars = 8 tokens


def test_embedding_holds_the_lock_once_per_batch(tiny):
    class CountingLock:
        entered = 0

        def __enter__(self):
            CountingLock.entered += 1

        def __exit__(self, *exc):
            return False

    embed_texts(tiny, [d.text for d in CORPUS], batch_size=3, lock=CountingLock(), progress=False)
    assert CountingLock.entered == 3  # 8 texts in batches of 3


def test_save_load_round_trip_gives_identical_results(tiny, tmp_path):
    proj = torch.nn.Linear(tiny.hidden_size, 16)
    for projection in (None, proj):
        r = Retriever(tiny, projection, progress=False).build(CORPUS)
        folder = tmp_path / ("proj" if projection is not None else "plain")
        r.save(folder)
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(["retriever.json", "bm25.json", "dense.faiss"]
                               + (["projection.safetensors"] if projection is not None else []))
        meta = json.loads((folder / "retriever.json").read_text())
        assert meta["backbone_fingerprint"] == tiny.info.fingerprint and meta["ids"] == [d.id for d in CORPUS]
        assert meta["dense"]["dim"] == (16 if projection is not None else tiny.hidden_size)
        assert meta["hybrid"] == {"fusion": "rrf", "k": 60, "depth": 100}
        assert json.loads((folder / "bm25.json").read_text())["corpus"][1][:3] == ["quagga", "the", "quagga"]
        for docs in (CORPUS, None):
            back = Retriever.load(folder, tiny, docs, progress=False)
            assert not back.rebuilt and back.index.d == r.index.d
            for method in ("bm25", "dense", "hybrid"):
                for q in ("extinct zebra", "capital city", "hot water"):
                    assert back.search(q, 5, method) == r.search(q, 5, method)


def test_a_fingerprint_mismatch_forces_a_rebuild(tiny, tmp_path):
    r = Retriever(tiny, progress=False).build(CORPUS)
    r.save(tmp_path)
    other = tiny_backbone(seed=3)
    assert other.info.fingerprint != tiny.info.fingerprint
    with pytest.raises(ValueError, match="pass the documents"):
        Retriever.load(tmp_path, other, progress=False)
    back = Retriever.load(tmp_path, other, CORPUS, progress=False)
    assert back.rebuilt and back.manifest()["backbone_fingerprint"] == other.info.fingerprint
    fresh = Retriever(other, progress=False).build(CORPUS)
    for method in ("dense", "hybrid", "bm25"):
        assert back.search("zebra in Africa", 5, method) == fresh.search("zebra in Africa", 5, method)
    assert back.search("zebra in Africa", 8, "dense") != r.search("zebra in Africa", 8, "dense")
    # documents that do not match the saved ids are re-indexed as a whole
    changed = [*CORPUS[:-1], Document("comet", "Comets have tails.", "Comet")]
    assert Retriever.load(tmp_path, tiny, changed, progress=False).rebuilt


def _pointer(root) -> dict:
    return json.loads((root / "kb" / "documents" / "current.json").read_text())


def test_document_store_reembeds_only_changed_documents_and_rebuilds_on_another_backbone(tiny, tmp_path, monkeypatch):
    import modules.core.retrieval as retrieval
    from service.documents import Documents
    from service.store import ModuleStore

    embedded = []
    real = retrieval.embed_texts
    monkeypatch.setattr(retrieval, "embed_texts",
                        lambda bb, texts, *a, **kw: embedded.append(len(texts)) or real(bb, texts, *a, **kw))
    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    dense = {"needs_dense": lambda task: True}
    docs = Documents(modules, tiny, **dense)
    docs.start()
    job = docs.wait("kb", docs.add("kb", _jsonl(_rows(CORPUS))).id)
    assert sum(embedded) == len(CORPUS) == job.done == job.total and job.status == "done"
    job = docs.wait("kb", docs.add("kb", _jsonl(_rows([Document("tea", "Green tea.", "Tea"),
                                                       Document("new", "Brand new.")]))).id)
    assert sum(embedded) == len(CORPUS) + 2 and job.total == 2  # only the replaced and the new document
    job = docs.add("kb", _jsonl(_rows([CORPUS[0]])))  # unchanged: its vector is known, nothing to embed
    assert job.status == "done" and sum(embedded) == len(CORPUS) + 2
    with_one_store = docs.search("kb", "green tea", 3, "hybrid")
    assert sum(embedded) == len(CORPUS) + 3  # the query
    docs.stop()

    reopened = Documents(ModuleStore(tmp_path), tiny, **dense)
    reopened.start()
    assert sum(embedded) == len(CORPUS) + 3  # loaded, not re-embedded
    assert reopened.search("kb", "green tea", 3, "hybrid") == with_one_store
    assert sum(embedded) == len(CORPUS) + 4  # the query
    reopened.stop()

    other = tiny_backbone(seed=3)
    moved = Documents(ModuleStore(tmp_path), other, **dense)
    moved.start()  # a dense index made on another backbone: BM25 serves, a job computes the vectors again
    assert moved.search("kb", "green tea", 1, "bm25")[0][0].id == "tea"
    job = moved.wait("kb", moved.jobs("kb")[0].id)  # the newest job: the one start-up queued
    assert job.status == "done" and job.done == len(CORPUS) + 1
    assert sum(embedded) == len(CORPUS) + 4 + len(CORPUS) + 1
    cur = _pointer(tmp_path)
    meta = json.loads((tmp_path / "kb" / "documents" / cur["latest"]["index"] / "retriever.json").read_text())
    assert meta["backbone_fingerprint"] == other.info.fingerprint and cur["latest"]["count"] == len(CORPUS) + 1
    assert cur["dense"] == cur["latest"]
    assert sorted(p.name for p in (tmp_path / "kb" / "documents").iterdir()) == sorted(
        ["current.json", cur["latest"]["docs"], cur["latest"]["index"], "jobs"])
    moved.stop()
    n = sum(embedded)
    again = Documents(ModuleStore(tmp_path), other, **dense)
    again.start()
    assert sum(embedded) == n and not [j for j in again.jobs("kb") if not j.finished]  # saved: nothing to redo
    again.stop()


def test_leftovers_of_an_interrupted_write_are_removed_and_a_lost_index_is_rebuilt(tiny, tmp_path):
    import shutil

    from service.documents import Documents
    from service.store import ModuleStore

    modules = ModuleStore(tmp_path)
    modules.put("kb", _artifact(tiny), "prompt")
    Documents(modules, tiny).add("kb", _jsonl(_rows(CORPUS[:3])))
    folder = tmp_path / "kb" / "documents"
    cur = _pointer(tmp_path)
    g = cur["latest"]["generation"]
    (folder / f"docs-{g + 1}.jsonl").write_text("half")       # a write that never became current
    (folder / f".index-{g + 1}-abc.tmp").mkdir()
    (folder / ".current.json.x.tmp").write_text("{")
    (tmp_path / "kb" / ".documents-trash-1").mkdir()
    shutil.rmtree(folder / cur["latest"]["index"])            # and the current index is lost
    store = Documents(ModuleStore(tmp_path), tiny)
    store.start()
    assert [d.id for d in store.list("kb")[1]] == ["paris", "quagga", "tea"]
    assert store.search("kb", "extinct zebra", 1, "bm25")[0][0].id == "quagga"
    cur2 = _pointer(tmp_path)
    assert cur2["latest"]["generation"] > g and sorted(p.name for p in folder.iterdir()) == sorted(
        ["current.json", cur2["latest"]["docs"], cur2["latest"]["index"], "jobs"])
    assert not (tmp_path / "kb" / ".documents-trash-1").exists()
    store.stop()


def test_a_write_by_another_process_on_the_same_store_is_seen(tiny, tmp_path):
    """Replicas share the store: each read checks current.json's stamp and reloads when it changed."""
    from service.documents import Documents
    from service.store import ModuleStore

    ModuleStore(tmp_path).put("kb", _artifact(tiny), "prompt")
    a, b = Documents(ModuleStore(tmp_path), tiny), Documents(ModuleStore(tmp_path), tiny)
    a.add("kb", _jsonl(_rows(CORPUS[:2])))
    assert [d.id for d in b.list("kb")[1]] == ["paris", "quagga"]
    b.clear("kb")
    a.add("kb", _jsonl(_rows([CORPUS[2]])))  # generation 1 again, after a clear: told apart by the stamp
    assert [d.id for d in b.list("kb")[1]] == ["tea"] and b.get("kb", "tea") == CORPUS[2]
    assert b.search("kb", "hot water leaves", 1, "bm25")[0][0].id == "tea"


def test_an_unreadable_pointer_makes_documents_unavailable_until_cleared(tiny, tmp_path):
    from service.documents import Documents
    from service.errors import Unavailable
    from service.store import ModuleStore

    ModuleStore(tmp_path).put("kb", _artifact(tiny), "prompt")
    Documents(ModuleStore(tmp_path), tiny).add("kb", _jsonl(_rows(CORPUS[:2])))
    (tmp_path / "kb" / "documents" / "current.json").write_text("{broken")
    store = Documents(ModuleStore(tmp_path), tiny)
    store.start()
    assert len(list((tmp_path / "kb" / "documents").iterdir())) == 4  # nothing removed
    with pytest.raises(Unavailable, match="unreadable"):
        store.list("kb")
    store.clear("kb")
    assert store.list("kb") == (0, [])
    store.stop()


def test_a_read_never_rebuilds_or_writes_an_index(tiny, tmp_path):
    """Another process's generation whose index cannot be read: a reader answers 503 and writes
    nothing (no rebuild on a request's path); the next start rebuilds it."""
    import shutil

    from service.documents import Documents
    from service.errors import Unavailable
    from service.store import ModuleStore

    ModuleStore(tmp_path).put("kb", _artifact(tiny), "prompt")
    reader = Documents(ModuleStore(tmp_path), tiny)
    reader.start()
    assert reader.list("kb") == (0, [])
    Documents(ModuleStore(tmp_path), tiny).add("kb", _jsonl(_rows(CORPUS[:3])))  # another process writes
    shutil.rmtree(tmp_path / "kb" / "documents" / _pointer(tmp_path)["latest"]["index"])
    before = _snapshot(tmp_path)
    for read in (lambda: reader.view("kb", "bm25"), lambda: reader.search("kb", "zebra", 3, "bm25"),
                 lambda: reader.list("kb")):
        with pytest.raises(Unavailable, match="unreadable"):
            read()
    assert _snapshot(tmp_path) == before
    reader.stop()
    again = Documents(ModuleStore(tmp_path), tiny)
    again.start()
    assert again.search("kb", "extinct zebra", 1, "bm25")[0][0].id == "quagga"
    again.stop()
