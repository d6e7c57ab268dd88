"""Crash safety with a real server process: kill -9 during uploads never leaves a broken task."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import httpx

from modules.core.artifact import read_artifact
from modules.registry import kind_class, load_module
from service.store import ModuleStore
from tests.server import running_server


def _big_artifact(bb, seed: int) -> bytes:
    m = kind_class("lora").new(bb, {"targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], "r": 128, "seed": seed})
    return m.to_artifact()


def test_kill_9_during_uploads_leaves_the_old_or_the_new_version(tiny_served, tmp_path):
    folder, bb = tiny_served
    store_dir = tmp_path / "store"
    versions = {hashlib.sha256(a).hexdigest(): a for a in (_big_artifact(bb, 1), _big_artifact(bb, 2))}
    blobs = list(versions.values())
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(store_dir), "FROZENLM_EXAMPLES": "false"}
    rng = random.Random(0)
    kills = 0
    for round_ in range(4):
        with running_server(env) as url:
            if round_ == 0:
                assert httpx.put(f"{url}/tasks/victim", content=blobs[0], timeout=60).status_code == 201
            stop = threading.Event()

            def uploads():
                i = 0
                while not stop.is_set():
                    try:
                        httpx.put(f"{url}/tasks/victim", content=blobs[i % 2], timeout=60)
                    except httpx.HTTPError:
                        return  # the server died under us
                    i += 1

            t = threading.Thread(target=uploads)
            t.start()
            time.sleep(rng.uniform(0.2, 1.0))
            pid = _server_pid(url)
            import os
            import signal

            os.kill(pid, signal.SIGKILL)
            kills += 1
            stop.set()
            t.join(30)
        # after the crash: the store holds a complete artifact of one of the two versions
        store = ModuleStore(store_dir)
        stored = store.get("victim")
        data = store.read(stored)
        assert hashlib.sha256(data).hexdigest() == stored.sha256 in versions
        assert load_module(read_artifact(data), bb).kind == "lora"
        assert not [p for p in store_dir.rglob("*") if p.name.endswith(".tmp")]
    assert kills == 4
    with running_server(env) as url:  # and a restarted server lists and serves it
        tasks = httpx.get(f"{url}/tasks").json()["tasks"]
        assert [(t["name"], t["status"]) for t in tasks] == [("victim", "ready")]
        r = httpx.post(f"{url}/tasks/victim/infer", json={"inputs": "hi", "parameters": {"max_new_tokens": 3}},
                       timeout=60)
        assert r.status_code == 200


def _server_pid(url: str) -> int:
    """The pid of the process listening on the URL's port (the server we started)."""
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return conn.pid
    raise RuntimeError(f"no process listens on {port}")


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


LONG = {"inputs": ["tell me everything"] * 32, "parameters": {"max_new_tokens": 1000, "temperature": 0}}


def test_a_client_that_disconnects_cancels_its_rows(tiny_served, tmp_path):
    import socket

    folder, _ = tiny_served
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path), "FROZENLM_EXAMPLES": "false",
           "FROZENLM_MAX_BATCH_SIZE": "64", "FROZENLM_MAX_BATCH_TOKENS": "100000"}
    with running_server(env) as url:
        host, port = url.removeprefix("http://").split(":")
        body = __import__("json").dumps(LONG).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /tasks/base/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(1.0)  # decoding has started
        s.close()  # the client goes away
        deadline = time.monotonic() + 30
        while _metric(url, "frozenlm_cancelled_rows_total") < 32 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _metric(url, "frozenlm_cancelled_rows_total") == 32
        assert _metric(url, "frozenlm_generated_tokens_total") < 32 * 1000  # they stopped early


def test_sigterm_finishes_in_flight_requests(tiny_served, tmp_path):
    import os
    import signal

    folder, _ = tiny_served
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path), "FROZENLM_EXAMPLES": "false",
           "FROZENLM_MAX_BATCH_SIZE": "64", "FROZENLM_MAX_BATCH_TOKENS": "100000"}
    with running_server(env) as url:
        result = {}

        def call():
            r = httpx.post(f"{url}/tasks/base/infer", json=LONG, timeout=120)
            result["status"], result["body"], result["at"] = r.status_code, r.json(), time.monotonic()

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.8)  # the request is in flight
        pid = _server_pid(url)
        os.kill(pid, signal.SIGTERM)
        sent = time.monotonic()
        t.join(120)
        assert result["status"] == 200 and result["at"] > sent  # it was still running at SIGTERM
        assert len(result["body"]["outputs"]) == 32
        assert all(o["finish_reason"] in ("length", "stop") for o in result["body"]["outputs"])
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)  # and then the server stopped


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
