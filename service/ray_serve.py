"""Scale-out on Ray Serve (optional extra: `pip install "ray[serve]"`).

Each replica is one frozenlm server in-process (one backbone, its own engine); every replica
reads and writes the same module store (a shared folder), so a module uploaded once through any
replica is served by all of them. Task modules are multiplexed with `serve.multiplexed`, keyed by
task name: a request carrying the header `serve_multiplexed_model_id: <task>` (the frozenlm client
sends it) goes to a replica that already has that module loaded.

    from service.ray_serve import deployment
    serve.run(deployment({"FROZENLM_STORE_DIR": "/shared/modules"}, num_replicas=2), route_prefix="/")

or `python -m service.ray_serve` (settings from the environment; FROZENLM_RAY_REPLICAS replicas).
"""

from __future__ import annotations

import os
import re

import httpx
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from service.app import create_app
from service.config import Settings

_TASK = re.compile(r"^/(?:tasks/([^/]+)/infer)$")
REPLICA_HEADER = "x-frozenlm-replica"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class FrozenLMReplica:
    """One backbone per replica; the frozenlm app runs inside it, behind Serve's HTTP proxy."""

    def __init__(self, env: dict[str, str]):
        os.environ.update(env)
        self.app = create_app(Settings())
        self.app.state.runtime.load()  # backbone, store, engine (what the lifespan does)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                      timeout=None)
        self.replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=64)
    async def task(self, name: str):
        """Load a task's module into this replica's loaded modules (Serve keeps the hot ones here)."""
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.app.state.runtime.loaded.resolve, name)

    async def __call__(self, request: Request) -> Response:
        m = _TASK.match(request.url.path)
        if m and serve.get_multiplexed_model_id() == m.group(1):
            try:
                await self.task(m.group(1))
            except Exception:  # noqa: BLE001 - the app answers the same error (404, 503) below
                pass
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        resp = await self.http.request(request.method, request.url.path, params=request.query_params,
                                       content=await request.body(), headers=headers)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        out[REPLICA_HEADER] = self.replica
        return Response(resp.content, status_code=resp.status_code, headers=out)


def deployment(env: dict[str, str] | None = None, num_replicas: int = 2):
    """A bound Serve application: `num_replicas` frozenlm replicas sharing FROZENLM_STORE_DIR."""
    settings_env = {k: v for k, v in os.environ.items() if k.startswith("FROZENLM_")} | (env or {})
    return FrozenLMReplica.options(num_replicas=num_replicas).bind(settings_env)


def main() -> None:
    """`python -m service.ray_serve`: a local Ray cluster (or RAY_ADDRESS's) serving on FROZENLM_HOST:PORT."""
    import threading

    import ray

    settings = Settings()
    ray.init(address=os.environ.get("RAY_ADDRESS"))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(num_replicas=settings.ray_replicas), route_prefix="/", name="frozenlm")
    threading.Event().wait()  # serve until stopped


if __name__ == "__main__":
    main()
