"""Crash safety with a real server process: kill -9 during uploads never leaves a broken task."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import httpx

from modules.artifact import read_artifact
from modules.base import kind_class, load_module
from service.store import ModuleStore
from service.testing import running_server


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
