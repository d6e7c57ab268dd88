"""Kind `rrr` (retrieve, rerank, read) on the tiny model: packing, exact batching with other kinds,
artifacts with and without documents, and the HTTP path (documents uploaded, passages answered)."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import torch

from modules.core.artifact import read_artifact
from modules.core.decode import GenItem, Sampling
from modules.core.retrieval import DOCUMENTS_FILE, VECTORS_FILE, Document, Retriever, documents_files
from modules.core.running import generate
from modules.core.stages import Context, prepare
from modules.kinds.rrr import Corpus, pack
from modules.registry import kind_class, load_module
from tests.test_batching import _modules, _randomize
from tests.test_documents import CORPUS

QUESTIONS = ["Which zebra is extinct?", "What do sea otters crack open?", "capital of France on the Seine",
             "what is made from flour", "xylophone"]  # the last one shares no word with any document


@pytest.fixture(scope="module")
def corpus(tiny):
    return Corpus(Retriever(tiny, progress=False).build(CORPUS), CORPUS)


def _rrr(tiny, seed=50, **config):
    cfg = {"candidates": 4, "context_tokens": 160, "reader_prompt_tokens": 3, "rerank_passage_tokens": 48, **config}
    return _randomize(kind_class("rrr").new(tiny, cfg), seed, 0.5)


def _rrr_modules(tiny):
    return [_rrr(tiny), _rrr(tiny, 51, pool="last", reranker_depth=2, retrieval="hybrid"),
            _rrr(tiny, 52, rerank=False, retrieval="dense", reader_prompt_tokens=0),
            _rrr(tiny, 53, candidates=2, context_tokens=40, pool="mean")]


def attributes(module) -> dict:
    """What a module holds: each attribute's identity and, for plain values and containers, a deep
    copy of its content; each tensor's values (to compare before and after requests)."""
    import copy

    plain = (str, int, float, bool, type(None), dict, list, tuple, set, frozenset)
    out = {k: (id(v), copy.deepcopy(v) if isinstance(v, plain) else None)
           for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
    out["tensors"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    out["submodules"] = {k: id(v) for k, v in module.named_modules()}
    return out


def same_attributes(a: dict, b: dict) -> bool:
    ta, tb = a.pop("tensors"), b.pop("tensors")
    try:
        return a == b and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    finally:
        a["tensors"], b["tensors"] = ta, tb


def _same_passages(a: list[dict], b: list[dict]) -> None:
    """Same candidates, order, titles and packing; scores equal up to float noise (batching)."""
    assert [(p["id"], p.get("title"), p["used"]) for p in a] == [(p["id"], p.get("title"), p["used"]) for p in b]
    for name in ("score", "retrieval_score"):
        torch.testing.assert_close(torch.tensor([p[name] for p in a], dtype=torch.float64),
                                   torch.tensor([p[name] for p in b], dtype=torch.float64), atol=1e-4, rtol=1e-4)


def _prepare(tiny, pairs, documents=None):
    """Rows of (module, text) pairs, each given `documents` (or (module, text, documents) triples)."""
    with torch.inference_mode():
        return prepare(tiny, [(p[0], p[0].encode(p[1]), Context(p[2] if len(p) > 2 else documents)) for p in pairs])


# --- packing -------------------------------------------------------------------------------------


def test_pack_is_greedy_in_order_under_the_budget():
    assert pack([5, 9, 3], budget=10, separator=1) == [5, 0, 3]      # 9 does not fit after 5+1, 3 does
    assert pack([3, 3, 3, 3], budget=10, separator=1) == [3, 3, 0, 0]  # 3+1+3 = 7; 7+1+3 = 11 > 10
    assert pack([4, 5], budget=10, separator=1) == [4, 5]             # exactly full
    assert pack([15, 2, 3], budget=10, separator=1) == [10, 0, 0]     # the best alone is cut to the budget
    assert pack([], budget=10) == []
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 8))]
        budget, sep = rng.randint(1, 60), rng.randint(0, 3)
        taken = pack(lengths, budget, sep)
        kept = [n for n in taken if n]
        assert sum(kept) + sep * (len(kept) - 1) <= budget
        assert all(n in (0, length) for n, length in zip(taken[1:], lengths[1:]))  # whole or skipped
        assert taken[0] == min(lengths[0], budget)
        used = taken[0]
        for n, length in zip(taken[1:], lengths[1:]):  # greedy: a skipped passage did not fit at its turn
            if n:
                used += sep + n
            else:
                assert used + sep + length > budget


def test_the_reader_context_respects_the_budget(tiny, corpus):
    for budget in (20, 60, 200):
        m = _rrr(tiny, context_tokens=budget)
        cands = m.retrieve("zebra quagga France otters bread", corpus)
        ids, used = m.read("q", cands)
        empty, _ = m.read("q", [])
        assert len(ids) - len(empty) <= budget  # everything beyond the bare template is context
        assert used[0] and sum(used) >= 1
        if budget == 200:
            assert sum(used) > 1


# --- the module ----------------------------------------------------------------------------------


def test_question_pooling_reads_the_positions_after_the_passage(tiny, corpus):
    m = _rrr(tiny, rerank_passage_tokens=20)
    q, doc = "Which zebra is extinct?", CORPUS[1]
    ids, tail = m.rerank_ids(q, doc), m.tail_length(q)
    tok = lambda t: tiny.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids == tok("Passage: ") + tok(doc.passage)[:20] + tok("\nQuestion: ") + tok(q) + tok("\nRelevant:")
    assert tail == len(tok("\nQuestion: ") + tok(q) + tok("\nRelevant:"))
    states = torch.randn(len(ids), tiny.hidden_size)
    torch.testing.assert_close(m.features(states, tail), states[-tail:].mean(0))
    for pool, want in (("last", states[-1]), ("mean", states.mean(0))):
        torch.testing.assert_close(_rrr(tiny, pool=pool).features(states, tail), want)


def test_a_new_module_keeps_the_retrievers_order(tiny, corpus):
    m = kind_class("rrr").new(tiny, {"candidates": 5})
    for q in QUESTIONS[:4]:
        row = _prepare(tiny, [(m, q)], corpus)[0]
        hits = [d.id for d, _ in corpus.search(q, 5, "bm25")]
        assert [p["id"] for p in row.info["passages"]] == hits
        assert row.contribution.prepend.shape == (16, tiny.hidden_size)


def test_a_trained_head_reorders_and_packs_by_its_scores(tiny, corpus):
    m = _rrr(tiny, candidates=6, context_tokens=90)
    moved = 0
    for q in QUESTIONS[:4]:
        info = _prepare(tiny, [(m, q)], corpus)[0].info["passages"]
        scores = [p["score"] for p in info]
        assert scores == sorted(scores, reverse=True)
        assert info[0]["used"]
        moved += [p["id"] for p in info] != [d.id for d, _ in corpus.search(q, 6, "bm25")]
    assert moved  # a random head does change the order


def test_no_documents_or_no_hits_give_an_empty_context(tiny, corpus):
    m = _rrr(tiny)
    bare = kind_class("rrr").new(tiny, {"reader_prompt_tokens": 2})  # its request brings no documents
    rows = _prepare(tiny, [(m, "xylophone", corpus), (bare, "Which zebra is extinct?", None)])
    for module, row, q in zip((m, bare), rows, ("xylophone", "Which zebra is extinct?")):
        assert row.info == {"passages": []}
        assert row.ids == module.read(q, [])[0]
        assert module.tokenizer.decode(row.ids).startswith("Context: \nQuestion: ")


def test_rrr_rows_prepared_and_generated_with_other_kinds_equal_each_alone(tiny, corpus):
    """Reranker probes batch with ID-PT and recursive probes, readers with every other kind's rows."""
    others = _modules(tiny)
    mods = _rrr_modules(tiny)
    pairs = [(m, q) for m in mods for q in QUESTIONS] + [(m, q) for m, q in zip(others, QUESTIONS * 4)]
    random.Random(1).shuffle(pairs)
    together = _prepare(tiny, pairs, corpus)
    for pair, row in zip(pairs, together):
        alone = _prepare(tiny, [pair], corpus)[0]
        assert row.ids == alone.ids
        for name in ("prepend", "prefix"):
            a, b = getattr(row.contribution, name), getattr(alone.contribution, name)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert (row.info is None) == (alone.info is None) == (pair[0].kind != "rrr")
        if row.info is not None:  # reranker scores, batched == alone
            _same_passages(row.info["passages"], alone.info["passages"])
    assert sum(bool(r.info and r.info["passages"]) for r in together) >= 12

    items = [GenItem(r.ids, r.contribution, Sampling(max_new_tokens=6 + i % 5)) for i, r in enumerate(together)]
    with torch.inference_mode():
        gen = generate(tiny, items)
        assert [g.token_ids for g in gen] == [generate(tiny, [it])[0].token_ids for it in items]
    assert len({tuple(g.token_ids) for g in gen}) > 10


def test_identical_questions_in_one_batch_each_get_their_passages(tiny, corpus):
    m = _rrr(tiny)
    before = attributes(m)
    rows = _prepare(tiny, [(m, QUESTIONS[0]), (m, QUESTIONS[1]), (m, QUESTIONS[0])], corpus)
    assert rows[0].info == rows[2].info != rows[1].info
    assert rows[0].ids == rows[2].ids
    assert same_attributes(attributes(m), before)  # the candidates travelled with the rows, not on the module


def test_pass_length_bounds_both_passes(tiny, corpus):
    m = _rrr(tiny, context_tokens=50, rerank_passage_tokens=200)
    for q in QUESTIONS:
        ids = m.encode(q)
        bound = m.pass_length(len(ids))
        row = _prepare(tiny, [(m, q)], corpus)[0]
        assert len(row.ids) + row.contribution.num_virtual_tokens <= bound
        for c in m.retrieve(q, corpus):
            assert len(m.rerank_ids(q, c.doc)) <= bound


def test_bad_configs_are_refused(tiny):
    from pydantic import ValidationError

    from modules.core.artifact import ArtifactError

    with pytest.raises(ValidationError, match="context"):
        kind_class("rrr").new(tiny, {"reader_template": "Q: {input}"})
    with pytest.raises(ValidationError, match="passage"):
        kind_class("rrr").new(tiny, {"rerank_template": "{input}"})
    with pytest.raises(ArtifactError, match="reranker_depth"):
        kind_class("rrr").new(tiny, {"reranker_depth": 9})
    with pytest.raises(ArtifactError, match="chat"):
        kind_class("rrr").new(tiny, chat=True)


# --- artifacts -----------------------------------------------------------------------------------


def test_artifact_round_trip_with_and_without_documents(tiny, corpus):
    m = _rrr(tiny, pool="last", retrieval="hybrid")
    plain = m.to_artifact()
    files = read_artifact(plain)
    assert sorted(files) == ["module.json", "weights.safetensors"]
    back = load_module(files, tiny)
    assert back.kind == "rrr" and back.config == m.config
    assert sorted(back.tensors()) == ["rrr.head.bias", "rrr.head.weight", "rrr.norm.bias", "rrr.norm.weight",
                                      "rrr.prior_weight", "rrr.reader_prompt"]
    for k, v in m.tensors().items():
        assert torch.equal(back.tensors()[k], v)
    q = QUESTIONS[0]
    a, b = _prepare(tiny, [(m, q)], corpus)[0], _prepare(tiny, [(back, q)], corpus)[0]
    assert a.ids == b.ids and a.info == b.info

    retriever = Retriever(tiny, progress=False).build(CORPUS)
    with_docs = read_artifact(m.to_artifact(files=documents_files(CORPUS, retriever)))
    assert sorted(with_docs) == [DOCUMENTS_FILE, VECTORS_FILE, "module.json", "weights.safetensors"]
    lines = [json.loads(x) for x in with_docs[DOCUMENTS_FILE].decode().splitlines()]
    assert [Document(r["id"], r["text"], r.get("title")) for r in lines] == CORPUS
    assert load_module(with_docs, tiny).config == m.config
    from modules.core.retrieval import read_vectors

    rebuilt = Retriever(tiny, progress=False).build(CORPUS, vectors=read_vectors(with_docs[VECTORS_FILE]))
    for method in ("dense", "hybrid", "bm25"):
        assert rebuilt.search("zebra in Africa", 5, method) == retriever.search("zebra in Africa", 5, method)
    bm25_only = read_artifact(m.to_artifact(files=documents_files(CORPUS)))
    assert VECTORS_FILE not in bm25_only and DOCUMENTS_FILE in bm25_only


# --- over HTTP -----------------------------------------------------------------------------------

ADMIN = {"Authorization": "Bearer rrr-admin"}
JSONL = {"content-type": "application/x-ndjson"}


def _jsonl(docs) -> bytes:
    return documents_files(docs)[DOCUMENTS_FILE]


@pytest.fixture(scope="module")
def served(tiny_served, tmp_path_factory):
    from tests.server import running_server

    folder, bb = tiny_served
    store = tmp_path_factory.mktemp("rrr-store")
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(store), "FROZENLM_EXAMPLES": "false",
           "FROZENLM_ADMIN_KEY": "rrr-admin", "FROZENLM_DEVICE": "cpu", "FROZENLM_MAX_INPUT_TOKENS": "1024"}
    with running_server(env) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=120) as c:
        yield c, store, bb


def test_infer_over_http_with_uploaded_documents(served):
    c, store, bb = served
    corpus = Corpus(Retriever(bb, progress=False).build(CORPUS), CORPUS)
    m = _rrr(bb, candidates=3, context_tokens=100)
    assert c.put("/tasks/qa", content=m.to_artifact()).status_code == 201
    r = c.post("/tasks/qa/infer", json={"inputs": "Which zebra is extinct?"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "no_documents" and "POST /tasks/qa/documents" in r.json()["error"]["message"]

    assert c.post("/tasks/qa/documents", content=_jsonl(CORPUS), headers=JSONL).status_code == 202
    params = {"max_new_tokens": 5}
    r = c.post("/tasks/qa/infer", json={"inputs": QUESTIONS[:3], "parameters": params})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = _prepare(bb, [(m, q) for q in QUESTIONS[:3]], corpus)  # the same module, in process
    for out, row in zip(body["outputs"], expected):
        assert out["finish_reason"] in ("stop", "length") and isinstance(out["text"], str)
        assert set(out["passages"][0]) == {"id", "title", "score", "retrieval_score", "used"}
        _same_passages(out["passages"], row.info["passages"])
    assert body["outputs"][0]["passages"][0]["id"] in {"quagga", "paris", "otter", "tea", "volcano", "chess",
                                                       "bread", "comet"}
    with torch.inference_mode():
        text = generate(bb, [GenItem(expected[0].ids, expected[0].contribution, Sampling(max_new_tokens=5))])[0].text
    assert body["outputs"][0]["text"] == text

    # other tasks answer as before (no passages), also in the same batch as rrr rows
    c.put("/tasks/plain", content=kind_class("prompt").new(bb, {"num_virtual_tokens": 2}).to_artifact())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(c.post, f"/tasks/{t}/infer", json={"inputs": q, "parameters": params})
                for t, q in [("qa", QUESTIONS[1]), ("plain", "hi"), ("base", "hello"), ("qa", QUESTIONS[3])]]
        answers = [f.result().json() for f in futs]
    assert "passages" in answers[0]["outputs"][0] and "passages" in answers[3]["outputs"][0]
    assert "passages" not in answers[1]["outputs"][0] and "passages" not in answers[2]["outputs"][0]

    # streaming: the final event carries the passages
    with c.stream("POST", "/tasks/qa/infer", json={"inputs": QUESTIONS[0], "stream": True, "parameters": params}) as s:
        events = s.read().decode()
    done = json.loads(events.split("event: done")[1].split("data: ", 1)[1].split("\r\n")[0].split("\n")[0])
    _same_passages(done["outputs"][0]["passages"], body["outputs"][0]["passages"])

    # documents cleared: 409 again
    assert c.delete("/tasks/qa/documents").status_code == 204
    assert c.post("/tasks/qa/infer", json={"inputs": "x"}).status_code == 409


def test_an_artifact_with_documents_installs_them(served):
    c, store, bb = served
    retriever = Retriever(bb, progress=False).build(CORPUS[:5])
    m = _rrr(bb, retrieval="hybrid")
    r = c.put("/tasks/kb-qa", content=m.to_artifact(files=documents_files(CORPUS[:5], retriever)))
    assert r.status_code == 201, r.text
    listed = c.get("/tasks/kb-qa/documents").json()
    assert listed["count"] == 5 and [d["id"] for d in listed["documents"]] == [d.id for d in CORPUS[:5]]
    hits = c.get("/tasks/kb-qa/documents/search", params={"q": "zebra", "k": 5, "method": "dense"}).json()["results"]
    assert [(h["id"], round(h["score"], 4)) for h in hits] == [
        (i, round(s, 4)) for i, s in retriever.search("zebra", 5, "dense")]
    out = c.post("/tasks/kb-qa/infer", json={"inputs": "extinct zebra", "parameters": {"max_new_tokens": 3}}).json()
    assert out["outputs"][0]["passages"][0]["id"] in {d.id for d in CORPUS[:5]}

    # a new version with other documents replaces them all (their vectors are computed by a job)
    r = c.put("/tasks/kb-qa", content=m.to_artifact(files=documents_files(CORPUS[5:])))
    assert r.status_code == 201 and r.json()["version"] == 2
    assert [d["id"] for d in c.get("/tasks/kb-qa/documents").json()["documents"]] == [d.id for d in CORPUS[5:]]
    [job] = [j for j in c.get("/tasks/kb-qa/documents/jobs").json()["jobs"] if j["generation"] == 2]
    while (job := c.get(f"/tasks/kb-qa/documents/jobs/{job['id']}").json())["status"] != "done":
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    assert job["dense"] and job["done"] == job["total"] == len(CORPUS[5:])


@pytest.mark.parametrize("files,needle", [
    ({DOCUMENTS_FILE: b'{"id": "a", "text": ""}\n'}, "documents.jsonl: line 1"),
    ({DOCUMENTS_FILE: b'{"id": "a", "text": "x"}\n', VECTORS_FILE: b"nope"}, VECTORS_FILE),
    ("three vectors for two documents", "shape"),
])
def test_an_artifact_with_bad_documents_is_refused_and_stores_nothing(served, files, needle):
    c, store, bb = served
    m = kind_class("rrr").new(bb, {})
    if isinstance(files, str):
        three = documents_files(CORPUS[:3], Retriever(bb, progress=False).build(CORPUS[:3]))
        files = {**documents_files(CORPUS[:2]), VECTORS_FILE: three[VECTORS_FILE]}
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    r = c.put("/tasks/bad-qa", content=m.to_artifact(files=files))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_artifact" and needle in r.json()["error"]["message"]
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) == before


# --- on the real backbone ------------------------------------------------------------------------

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples" / "tasks" / "squad-rrr.zip"
SQUAD = EXAMPLE.parent.parent.parent / "tests" / "data" / "squad" / "dev-v1.1.article1.json"  # a slice, see its README


@pytest.mark.integration
def test_the_squad_example_and_documents_uploaded_through_the_api(admin, server):
    """The shipped example answers from its 1,048 passages; the same module on a few passages
    posted through the API; its rows batched with other tasks' give the answer they give alone."""
    from concurrent.futures import ThreadPoolExecutor

    from clients import Conflict
    from modules.core.artifact import pack
    from tests.conftest import INTEGRATION_ADMIN_KEY

    tasks = {t.name: t for t in admin.list_tasks()}
    assert tasks["squad-rrr"].kind == "rrr" and tasks["squad-rrr"].status == "ready"
    out = admin.infer("squad-rrr", "Which NFL team represented the AFC at Super Bowl 50?", max_new_tokens=8)
    passages = out.outputs[0].passages
    assert len(passages) == 8 and any(p["used"] and p["id"].startswith("00-") for p in passages)  # Super Bowl 50

    files = {k: v for k, v in read_artifact(EXAMPLE.read_bytes()).items() if k not in (DOCUMENTS_FILE, VECTORS_FILE)}
    admin.upload("kb-rrr", pack(files))
    with pytest.raises(Conflict, match="no documents|has none"):
        admin.infer("kb-rrr", "anything")
    article = json.loads(SQUAD.read_text())["data"][0]  # Warsaw
    docs = [Document(f"warsaw-{i}", p["context"], "Warsaw") for i, p in enumerate(article["paragraphs"][:10])]
    r = httpx.post(f"{server[0]}/tasks/kb-rrr/documents", content=_jsonl(docs), timeout=300,
                   headers={**JSONL, "Authorization": f"Bearer {INTEGRATION_ADMIN_KEY}"})
    assert r.status_code == 202 and r.json()["count"] == 10
    question = article["paragraphs"][0]["qas"][0]["question"]
    alone = admin.infer("kb-rrr", question, max_new_tokens=8).outputs[0]
    assert alone.passages and {p["id"] for p in alone.passages} <= {d.id for d in docs}
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(admin.infer, t, q, max_new_tokens=8) for t, q in
                [("sst2", "a gorgeous film"), ("kb-rrr", question), ("base", "Hi!"), ("squad-rrr", question)]]
        together = [f.result().outputs[0] for f in futs]
    assert together[1].text == alone.text and [p["id"] for p in together[1].passages] == [p["id"] for p in alone.passages]
    assert together[0].label == "positive" and together[2].passages is None


def test_a_loaded_module_is_unchanged_by_requests_with_documents(tmp_path, tiny):
    """The task's documents travel with each request (its Context), never on the shared module:
    after requests over two generations of documents, streamed and batched, the loaded module's
    attributes and tensors are what they were."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    settings = Settings(store_dir=tmp_path, examples=False, _env_file=None)
    app = create_app(settings, backbone=tiny, wait_ready=True)
    with TestClient(app) as c:
        rt = app.state.runtime
        assert c.put("/tasks/qa", content=_rrr(tiny, candidates=3, retrieval="hybrid").to_artifact()).status_code == 201
        assert c.post("/tasks/qa/documents", content=_jsonl(CORPUS[:6]), headers=JSONL).status_code < 300
        params = {"max_new_tokens": 3}
        first = c.post("/tasks/qa/infer", json={"inputs": "Which zebra is extinct?", "parameters": params}).json()
        module = rt.loaded.resolve("qa").module
        before = attributes(module)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda q: c.post("/tasks/qa/infer", json={"inputs": q, "parameters": params}),
                                    QUESTIONS))
        assert all(r.status_code == 200 for r in answers)
        assert c.post("/tasks/qa/infer", json={"inputs": QUESTIONS[1], "stream": True,
                                               "parameters": params}).status_code == 200
        newer = [Document("zebra2", "Zebra zebra zebra: the quagga was a zebra.", "Zebras")]
        job = c.post("/tasks/qa/documents", content=_jsonl(newer), headers=JSONL).json()["job"]
        rt.documents.wait("qa", job["id"])  # hybrid: until then the task answers from the last complete index
        second = c.post("/tasks/qa/infer", json={"inputs": "Which zebra is extinct?", "parameters": params}).json()
        assert "zebra2" not in [p["id"] for p in first["outputs"][0]["passages"]]
        assert "zebra2" in [p["id"] for p in second["outputs"][0]["passages"]]  # each request reads the newest
        assert rt.loaded.resolve("qa").module is module
        assert same_attributes(attributes(module), before)
        assert "documents" not in vars(module)
