"""Defects found by probing the new features (per-token logprobs, n samples, background document
indexing) as a hostile or careless API user, against a real `frozenlm serve` on the tiny model.

Each test states what should happen; all were red before their fixes."""

from __future__ import annotations

import json
import threading
import time
from contextlib import suppress

import httpx
import pytest

from clients import Client
from modules.registry import kind_class
from tests.server import server_process

ADMIN_KEY = "probe-admin"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NDJSON = {**ADMIN, "content-type": "application/x-ndjson"}


class Probed:
    def __init__(self, url: str, log_path):
        self.url, self.log_path = url, log_path

    def log_errors(self) -> list[str]:
        """The server log's ERROR records so far (their message's first line)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                rec = json.loads(line)
                if rec.get("level") == "ERROR":
                    out.append(f"{rec.get('logger')}: {rec.get('msg', '').splitlines()[0]}")
        return out


@pytest.fixture(scope="module")
def srv(tiny_served, tmp_path_factory):
    """A real server on the tiny model, its log in a file the tests read; tasks `gen` (a soft prompt
    that generates) and `sst2` (a soft prompt that scores labels)."""
    folder, bb = tiny_served
    root = tmp_path_factory.mktemp("probe")
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_ADMIN_KEY": ADMIN_KEY, "FROZENLM_STORE_DIR": str(root / "store")}
    log_path = root / "server.log"
    with server_process(env, log_path=log_path) as (url, _):
        prompt = kind_class("prompt")
        sst2 = prompt.new(bb, {"num_virtual_tokens": 2}, template="Review: {input}\nSentiment:",
                          labels={"negative": "n", "positive": "p"})
        gen = prompt.new(bb, {"num_virtual_tokens": 2}, template="Q: {input}\nA:")
        for name, m in (("sst2", sst2), ("gen", gen)):
            assert httpx.put(f"{url}/tasks/{name}", content=m.to_artifact(), headers=ADMIN).status_code == 201
        yield Probed(url, log_path)


def _put_task(srv, name: str, tiny_served) -> None:
    m = kind_class("prompt").new(tiny_served[1], {"num_virtual_tokens": 2}, template="Q: {input}\nA:")
    assert httpx.put(f"{srv.url}/tasks/{name}", content=m.to_artifact(), headers=ADMIN).status_code == 201


# --- documents ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc_id", [".", ".."])
def test_dot_segments_are_no_document_ids(srv, tiny_served, doc_id):
    """'.' and '..' cannot be a URL path segment (clients and proxies resolve them), so no client could
    address such a document: the upload is refused."""
    _put_task(srv, "dots", tiny_served)
    try:
        r = httpx.post(f"{srv.url}/tasks/dots/documents", content=json.dumps({"id": doc_id, "text": "t"}) + "\n",
                       headers=NDJSON)
        assert r.status_code == 422 and "reserved" in r.text, r.text
    finally:
        httpx.delete(f"{srv.url}/tasks/dots", headers=ADMIN)


@pytest.mark.parametrize("doc_id", ["../../gen", "%2e%2e", "a?b", "a#b", ".../x"])
def test_the_client_gets_every_document_id_the_server_accepts(srv, tiny_served, doc_id):
    """POST accepts these ids and Client.get_document fetches each one: it percent-encodes the id
    (unencoded, '../../gen' reached task 'gen', '%2e%2e' document '..', 'a?b' and 'a#b' document 'a')."""
    _put_task(srv, "ids", tiny_served)
    ids = list(dict.fromkeys([doc_id, "a", "gen"]))  # the id, and those a wrong URL would reach instead
    body = "".join(json.dumps({"id": i, "text": f"text of {i}"}) + "\n" for i in ids)
    assert httpx.post(f"{srv.url}/tasks/ids/documents", content=body, headers=NDJSON).status_code == 202
    with Client(srv.url, api_key=ADMIN_KEY) as c:
        try:
            got = c.get_document("ids", doc_id)
        finally:
            httpx.delete(f"{srv.url}/tasks/ids", headers=ADMIN)
    assert got == {"id": doc_id, "text": f"text of {doc_id}", "title": None}


def test_a_superseded_dense_job_leads_to_the_job_that_computes_the_vectors(srv, tiny_served):
    """A task whose module does not retrieve densely (`gen2`): its uploads' jobs are `dense: false`
    (done at once). A dense search starts a dense job J1 and waits for it. Documents posted while J1
    runs make job J2 (`dense: false`, done at once) and mark J1 `superseded_by: J2`; the dense work
    goes on in a third job J3 that nothing links to. So following `superseded_by` from J1 (what
    Client.wait_documents does, and README says "the newer job indexes both") ends at J2, 'done',
    dense false, while J3 is still embedding. Expected: the chain from a dense job ends at the job
    that computes the dense vectors (J3), or J2 is itself that job."""
    _put_task(srv, "gen2", tiny_served)
    words = ["zebra", "lion", "apple", "river", "stone", "cloud", "music", "paper", "glass", "forest"]
    docs = "".join(json.dumps({"id": f"d{i}", "text": " ".join(words[(i * 7 + j * 3) % 10] for j in range(60))})
                   + "\n" for i in range(6000))
    assert httpx.post(f"{srv.url}/tasks/gen2/documents", content=docs, headers=NDJSON, timeout=120).status_code == 202
    answers = {}

    def dense_search():
        r = httpx.get(f"{srv.url}/tasks/gen2/documents/search", params={"q": "zebra", "method": "dense"},
                      headers=ADMIN, timeout=600)
        answers["dense"] = r.status_code

    searcher = threading.Thread(target=dense_search)
    searcher.start()
    try:
        j1 = None
        for _ in range(600):
            running = [j for j in httpx.get(f"{srv.url}/tasks/gen2/documents/jobs", headers=ADMIN).json()["jobs"]
                       if j["dense"] and j["status"] in ("queued", "running")]
            if running:
                j1 = running[0]
                break
            time.sleep(0.05)
        assert j1 is not None, "the dense search started no dense job"
        r = httpx.post(f"{srv.url}/tasks/gen2/documents", content=json.dumps({"id": "new", "text": "zebra"}) + "\n",
                       headers=NDJSON)
        assert r.status_code == 202
        now = httpx.get(f"{srv.url}/tasks/gen2/documents/jobs/{j1['id']}", headers=ADMIN).json()
        if now["status"] == "done":
            pytest.skip("the dense job finished before the second upload (machine too fast for this probe)")
        job = now
        while job["superseded_by"]:
            job = httpx.get(f"{srv.url}/tasks/gen2/documents/jobs/{job['superseded_by']}", headers=ADMIN).json()
        assert job["dense"], f"the chain from dense job {j1['id']} ends at a job that embeds nothing: {job}"
    finally:
        searcher.join()
        httpx.delete(f"{srv.url}/tasks/gen2", headers=ADMIN, timeout=60)
    assert answers["dense"] == 200


# --- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("logprobs", False), ("logprobs", True), ("n", True)])
def test_a_boolean_for_an_integer_parameter_is_422(srv, field, value):
    """`{"parameters": {"logprobs": false}}` (a careless user meaning 'no logprobs') answers 200 with
    logprobs for every token (false is read as k = 0); `logprobs: true` is k = 1, `n: true` n = 1.
    pydantic's lax int accepts bools (and "5" strings). Expected: 422 naming parameters.<field>."""
    r = httpx.post(f"{srv.url}/tasks/gen/infer", headers=ADMIN, timeout=60,
                   json={"inputs": "hi", "parameters": {"max_new_tokens": 2, field: value}})
    assert r.status_code == 422, r.text
    assert f"parameters.{field}" in r.json()["error"]["message"]


def test_openai_completions_logprobs_false_returns_no_logprobs(srv):
    r = httpx.post(f"{srv.url}/v1/completions", headers=ADMIN, timeout=60,
                   json={"model": "gen", "prompt": "hi", "max_tokens": 2, "logprobs": False})
    assert r.status_code == 422 or r.json()["choices"][0]["logprobs"] is None, r.text


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "gen", "prompt": "hi", "max_tokens": 2, "n": None}),
    ("/v1/completions", {"model": "gen", "prompt": "hi", "max_tokens": 2, "stream": None}),
    ("/v1/chat/completions", {"model": "gen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "n": None}),
])
def test_openai_null_n_and_stream_take_their_defaults(srv, path, body):
    r = httpx.post(srv.url + path, json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1


def test_openai_completions_text_offset_indexes_the_text(srv):
    """/v1/completions `logprobs`: `text_offset[i]` must be where token i's text starts in `text`
    (OpenAI's meaning; clients slice the text with it). A token holding part of a multi-byte
    character is reported as "\\ufffd" and counted as one character, so when two or three such
    tokens make one character every later offset is too large: e.g. text 'Һ�~��[' (6 characters)
    with tokens ['�','�','�','�','~','�','�','['] gets offsets 0..7, and text[7:] is '' where '['
    is at 5. Here: for every whole token (not U+FFFD), text[offset:offset+len(token)] == token."""
    wrong = []
    for seed in range(0, 64, 4):
        r = httpx.post(f"{srv.url}/v1/completions", headers=ADMIN, timeout=60,
                       json={"model": "gen", "prompt": "hi", "n": 4, "max_tokens": 8, "temperature": 1.0,
                             "seed": seed, "logprobs": 0})
        assert r.status_code == 200, r.text
        for c in r.json()["choices"]:
            lp = c["logprobs"]
            for tok, off in zip(lp["tokens"], lp["text_offset"]):
                if "\ufffd" not in tok and c["text"][off:off + len(tok)] != tok:
                    wrong.append((c["text"], lp["tokens"], lp["text_offset"]))
                    break
    assert not wrong, f"{len(wrong)} choices, e.g. {wrong[0]}"


# --- disconnects ----------------------------------------------------------------------------------


def test_a_client_that_disconnects_logs_no_error(srv):
    """A client that gives up (a read timeout on a non-streamed n=16 request; closing an n=16
    stream after a few events) is routine: its rows are cancelled (frozenlm_cancelled_rows_total
    rises by 16 each, correctly), but the server logs ERROR records with tracebacks for each, which
    page whoever watches ERRORs. Expected: no ERROR record (at most an INFO access line)."""
    before = len(srv.log_errors())
    with suppress(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/tasks/gen/infer", headers=ADMIN, timeout=1.5,
                   json={"inputs": "hi", "parameters": {"n": 16, "max_new_tokens": 800, "temperature": 1.0}})
    with httpx.stream("POST", f"{srv.url}/tasks/gen/infer", headers=ADMIN, timeout=60,
                      json={"inputs": "hi", "stream": True,
                            "parameters": {"n": 16, "max_new_tokens": 800, "temperature": 1.0}}) as r:
        for k, _ in enumerate(line for line in r.iter_lines() if line.startswith("data:")):
            if k >= 20:
                break
    # the server notices and cancels within a few decode steps; a later request is answered after that
    assert httpx.post(f"{srv.url}/tasks/sst2/infer", json={"inputs": "fine"}, headers=ADMIN,
                      timeout=120).status_code == 200
    for _ in range(40):  # the log records of the cancellation land asynchronously
        if len(srv.log_errors()) > before:
            break
        time.sleep(0.1)
    assert srv.log_errors()[before:] == []


def test_every_samples_seed_must_be_valid(srv):
    """Sample i is seeded seed + i, so seed + n - 1 must itself be a valid seed (else sample i could
    never be reproduced alone)."""
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "temperature": 1.0, "n": 4, "seed": 2**63 - 2}}
    r = httpx.post(f"{srv.url}/tasks/gen/infer", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 422 and "seed + n - 1" in r.text, r.text
    body["parameters"]["seed"] = 2**63 - 4
    assert httpx.post(f"{srv.url}/tasks/gen/infer", json=body, headers=ADMIN, timeout=60).status_code == 200


def test_every_samples_seed_must_be_valid_on_openai(srv):
    body = {"model": "gen", "prompt": "hi", "max_tokens": 2, "n": 4, "seed": 2**63 - 2}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 422 and "seed + n - 1" in r.text, r.text
