"""Attacks on the HTTP surface of a real server (issue 14: defects 2, 3 and 8): for each, the status
a client gets, that /readyz stays 200, that the store is byte-for-byte unchanged, and, where memory
was the harm, that the server's peak memory grows by less than 100 MB.

One server serves every test here: the tiny model, an admin key, a key scoped to `infer:sst2`,
short header and body timeouts and a small connection limit."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from modules.registry import kind_class
from tests.adversary import assert_ready, peak_growth_mb, served, store_digest

ADMIN = {"Authorization": "Bearer adv-admin"}
SST2_ONLY = {"Authorization": "Bearer adv-sst2"}
MAX_CONNECTIONS = 8
BIG = 21 * 1024 * 1024  # the reported body: 21 MB of JSON


@pytest.fixture(scope="module")
def srv(tiny_served, tmp_path_factory):
    folder, bb = tiny_served
    root = tmp_path_factory.mktemp("adversarial")
    keys = root / "keys.json"
    keys.write_text(json.dumps([{"name": "sst2-only", "key": "adv-sst2", "scopes": ["infer:sst2"]}]))
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_ADMIN_KEY": "adv-admin", "FROZENLM_API_KEYS_FILE": str(keys),
           "FROZENLM_BODY_TIMEOUT_S": "2", "FROZENLM_HEADER_TIMEOUT_S": "2",
           "FROZENLM_MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with served(env, root / "store") as s:
        prompt = kind_class("prompt")
        sst2 = prompt.new(bb, {"num_virtual_tokens": 2}, template="Review: {input}\nSentiment:",
                          labels={"negative": "n", "positive": "p"})
        kb = prompt.new(bb, {"num_virtual_tokens": 2}, template="Q: {input}\nA:")
        for name, m in (("sst2", sst2), ("kb", kb)):
            assert httpx.put(f"{s.url}/tasks/{name}", content=m.to_artifact(), headers=ADMIN).status_code == 201
        docs = "".join(json.dumps({"id": f"d{i}", "text": f"passage number {i} about zebras"}) + "\n"
                       for i in range(4))
        r = httpx.post(f"{s.url}/tasks/kb/documents", content=docs, timeout=60,
                       headers={**ADMIN, "content-type": "application/x-ndjson"})
        assert r.status_code == 202, r.text
        # the first dense search computes the dense vectors (a write): done here, so the reads below write nothing
        assert httpx.get(f"{s.url}/tasks/kb/documents/search?q=zebras&method=dense", headers=ADMIN,
                         timeout=120).status_code == 200
        yield s


def _refused_unchanged(srv, action) -> float:
    """Run `action` (it asserts the statuses); the store is unchanged and the server ready after
    it. Returns the server's peak memory growth (MB)."""
    before = store_digest(srv.store)
    growth = peak_growth_mb(srv.pid, action)
    assert store_digest(srv.store) == before
    assert_ready(srv.url)
    return growth


def _raw(srv, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (request line and headers, without the blank line's end
    when it is a partial request) and `body`."""
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    sock.close()
    return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# --- defect 2: the key before the body, a cap on the body, timeouts, a connection limit -------------


def test_a_huge_body_without_a_key_is_refused_before_it_is_read(srv):
    body = b'{"inputs": "' + b"x" * BIG + b'"}'

    def attack():
        def post(args):
            path, headers = args
            return httpx.post(srv.url + path, content=body, timeout=120,
                              headers={"content-type": "application/json", **headers}).status_code

        calls = [("/tasks/sst2/infer", {}), ("/v1/completions", {}), ("/v1/chat/completions", {}),
                 ("/tasks/kb/infer", SST2_ONLY)]
        with ThreadPoolExecutor(len(calls)) as pool:
            assert list(pool.map(post, calls)) == [401, 401, 401, 403]

    assert _refused_unchanged(srv, attack) < 100


def test_a_body_over_the_cap_is_413_from_its_length_or_as_it_arrives(srv):
    def attack():
        declared = _raw(srv, "POST /tasks/sst2/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adv-sst2\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n", b'{"inputs": "')
        answer = _answer(declared)
        assert _status(answer) == 413 and b"body_too_large" in answer
        over = 1024 * 1024 + 10  # one chunk past the 1 MiB default, and the chunked body left open
        chunked = _raw(srv, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adv-sst2\r\n"
                            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                       f"{over:x}\r\n".encode() + b"x" * over + b"\r\n")
        answer = _answer(chunked)
        assert _status(answer) == 413 and b"body_too_large" in answer

    assert _refused_unchanged(srv, attack) < 100


def test_a_body_sent_too_slowly_gets_408_and_the_connection_closed(srv):
    def attack():
        sock = _raw(srv, "POST /tasks/sst2/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adv-sst2\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n", b'{"inputs": ')
        answer = _answer(sock)  # returns once the server closes
        assert _status(answer) == 408 and b"body_timeout" in answer

    _refused_unchanged(srv, attack)


def test_idle_and_slow_header_connections_are_closed(srv):
    def attack():
        idle = _raw(srv, "")
        assert _answer(idle) == b""  # closed without a word
        slow = _raw(srv, "GET /readyz HTTP/1.1\r\nHost: x\r\n")
        slow.settimeout(0.5)
        closed = False
        for _ in range(120):  # a header byte every half second, never the blank line
            try:
                slow.sendall(b"X")
                closed = slow.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        slow.close()
        assert closed

    _refused_unchanged(srv, attack)


def test_headers_over_the_cap_are_400(srv):
    def attack():
        sock = _raw(srv, "GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + "a" * (66 * 1024))  # never ends
        assert _status(_answer(sock)) == 400

    assert _refused_unchanged(srv, attack) < 100


def test_connections_past_the_limit_are_refused_not_piled_up(srv):
    def attack():
        held = [_raw(srv, "") for _ in range(MAX_CONNECTIONS)]
        r = httpx.get(srv.url + "/readyz", timeout=30)
        assert r.status_code == 503  # refused while the limit is taken
        for sock in held:
            assert _answer(sock) == b""  # and the idle holders are closed by the header timeout

    _refused_unchanged(srv, attack)


# --- defect 3: documents need the task's scope --------------------------------------------------


@pytest.mark.parametrize("path", ["/tasks/kb/documents", "/tasks/kb/documents/d1",
                                  "/tasks/kb/documents/search?q=zebras&method=dense"])
def test_a_scoped_key_reads_no_other_tasks_documents(srv, path):
    def attack():
        r = httpx.get(srv.url + path, headers=SST2_ONLY, timeout=60)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert httpx.get(srv.url + path, headers=ADMIN, timeout=60).status_code == 200

    _refused_unchanged(srv, attack)
    assert httpx.get(srv.url + "/tasks/sst2/documents", headers=SST2_ONLY).status_code == 200


# --- defect 8: malformed input is a 4xx -----------------------------------------------------------

SURROGATE = '"\\ud800 film"'  # a lone surrogate, as JSON escapes it


@pytest.mark.parametrize("path,body", [
    ("/tasks/sst2/infer", '{"inputs": %s}' % SURROGATE),
    ("/tasks/sst2/infer", '{"inputs": ["ok", %s]}' % SURROGATE),
    ("/tasks/kb/infer", '{"inputs": "hi", "parameters": {"stop": [%s]}}' % SURROGATE),
    ("/v1/completions", '{"model": "sst2", "prompt": %s}' % SURROGATE),
    ("/v1/chat/completions", '{"model": "kb", "messages": [{"role": "user", "content": %s}]}' % SURROGATE),
    ("/v1/completions", '{"model": "sst2", "prompt": []}'),
    ("/v1/completions", json.dumps({"model": "sst2", "prompt": ["a"] * 65})),
    ("/v1/completions", json.dumps({"model": "sst2", "prompt": ["a"] * 300})),
    ("/tasks/sst2/infer", json.dumps({"inputs": ["a"] * 300})),
])
def test_malformed_input_is_422(srv, path, body):
    def attack():
        r = httpx.post(srv.url + path, content=body, headers={**ADMIN, "content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text

    _refused_unchanged(srv, attack)


def test_a_document_with_a_lone_surrogate_is_422(srv):
    def attack():
        line = '{"id": "bad", "text": %s}\n' % SURROGATE
        r = httpx.post(srv.url + "/tasks/kb/documents", content=line, timeout=60,
                       headers={**ADMIN, "content-type": "application/x-ndjson"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_document", r.text

    _refused_unchanged(srv, attack)


# --- the earlier bad-request corpus (tests/test_api.py), and defect 1, against a real server --------

@pytest.mark.parametrize("body,status", [
    ({"inputz": "x"}, 422), ({"inputs": 5}, 422), ({"inputs": []}, 422),
    ({"inputs": "x", "parameters": {"temperature": -1}}, 422),
    ({"inputs": "x", "parameters": {"max_new_tokens": 100000}}, 422),
    ({"inputs": "x", "parameters": {"unknown": 1}}, 422),
    ({"inputs": "word " * 3000}, 413),
    ({"inputs": ["a", "b"], "stream": True}, 422),
    ({"inputs": "x", "parameters": {"choices": [" a"]}}, 422),
])
def test_the_earlier_bad_requests_are_refused(srv, body, status):
    def attack():
        r = httpx.post(srv.url + "/tasks/kb/infer", json=body, headers=ADMIN, timeout=60)
        assert r.status_code == status, r.text

    _refused_unchanged(srv, attack)


def test_a_tiny_temperature_beside_other_rows_fails_nobody(srv):
    """Defect 1: temperature 1e-300 on /infer and /v1/completions, concurrent with greedy and
    classification requests: every request is answered 200."""
    from concurrent.futures import ThreadPoolExecutor

    calls = [("/tasks/kb/infer", {"inputs": "hi", "parameters": {"temperature": 1e-300, "max_new_tokens": 3}}),
             ("/v1/completions", {"model": "kb", "prompt": "hi", "temperature": 1e-300, "max_tokens": 3}),
             ("/tasks/kb/infer", {"inputs": "hello", "parameters": {"max_new_tokens": 3}}),
             ("/tasks/sst2/infer", {"inputs": "a fine film"})] + \
        [("/tasks/kb/infer", {"inputs": "hi", "parameters": {"temperature": 1e-300, "max_new_tokens": 3}})] * 2
    assert len(calls) < MAX_CONNECTIONS  # the server's connection limit is not what this test is about

    def attack():
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c: httpx.post(srv.url + c[0], json=c[1], headers=ADMIN, timeout=60), calls))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]

    _refused_unchanged(srv, attack)
