"""Soak: many concurrent clients over real HTTP, many tasks; every response arrives and is the
right task's answer. A short soak runs in CI; the long one (2,000 requests, 20 tasks, 32 clients)
is marked slow (`make test-slow`)."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from modules.registry import kind_class
from tests.server import running_server

ADMIN = {"Authorization": "Bearer soak-admin"}


def _soak(folder, bb, tmp_path, n_tasks: int, n_requests: int, n_clients: int) -> None:
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path / "store"),
           "FROZENLM_EXAMPLES": "false", "FROZENLM_ADMIN_KEY": "soak-admin", "FROZENLM_MAX_QUEUE": "4096"}
    kinds = ["prompt", "lora", "prefix", "template"]
    with running_server(env) as url:
        tasks = []
        for i in range(n_tasks):
            name = f"task{i:02d}"
            kind = kinds[i % len(kinds)]
            cfg = {"lora": {"r": 2 + i % 5}, "prompt": {"num_virtual_tokens": 1 + i % 6},
                   "prefix": {"num_virtual_tokens": 1 + i % 4}, "template": {}}[kind]
            # label names are unique to the task: an answer of another task cannot pass for this one
            m = kind_class(kind).new(bb, cfg, labels={f"{name}-yes": " yes", f"{name}-no": " no"})
            assert httpx.put(f"{url}/tasks/{name}", content=m.to_artifact(), headers=ADMIN, timeout=60).status_code == 201
            tasks.append(name)
        rng = random.Random(0)
        plan = [(rng.choice(tasks), f"request {k}: " + "word " * rng.randint(1, 30)) for k in range(n_requests)]

        def call(job):
            task, text = job
            with httpx.Client(base_url=url, timeout=120) as c:
                r = c.post(f"/tasks/{task}/infer", json={"inputs": text})
            return job, r.status_code, r.json()

        with ThreadPoolExecutor(n_clients) as pool:
            answers = list(pool.map(call, plan))
        assert len(answers) == n_requests
        for (task, _), status, body in answers:
            assert status == 200, body
            out = body["outputs"][0]
            assert body["task"] == task and out["label"] in (f"{task}-yes", f"{task}-no")
        metrics = httpx.get(f"{url}/metrics").text
        ok = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("frozenlm_requests_total{") and 'outcome="ok"' in line)
        assert ok == n_requests


def test_short_soak(tiny_served, tmp_path):
    folder, bb = tiny_served
    _soak(folder, bb, tmp_path, n_tasks=8, n_requests=240, n_clients=16)


@pytest.mark.slow
def test_long_soak(tiny_served, tmp_path):
    folder, bb = tiny_served
    _soak(folder, bb, tmp_path, n_tasks=20, n_requests=2000, n_clients=32)
