"""create_app(settings): the FastAPI app. The backbone loads in a background thread at start-up,
so /healthz answers at once and /readyz turns 200 when the model is ready."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors, logs
from service.api import documents, health, infer, openai, tasks
from service.config import Settings
from service.runtime import Runtime

log = logging.getLogger("frozenlm")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def create_app(settings: Settings | None = None, *, backbone=None, wait_ready: bool = False) -> FastAPI:
    """The app. `backbone` injects an already-loaded Backbone (tests); `wait_ready=True` finishes
    loading before the app serves requests."""
    settings = settings or Settings()
    runtime = Runtime(settings, backbone)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.get_running_loop().run_in_executor(None, runtime.load)
        if wait_ready:
            await loading
        try:
            yield
        finally:
            try:
                await loading
            except Exception:  # noqa: BLE001 - already logged by Runtime.load
                pass
            runtime.stop()

    app = FastAPI(title="frozenlm", version="0.1.0", lifespan=lifespan,
                  description="One frozen language model, many small task modules applied per request.")
    app.state.runtime = runtime
    errors.install(app)
    logs.install(app)
    for router in (health.router, tasks.router, documents.router, infer.router, openai.router):
        app.include_router(router)
    return app


def run(host: str | None = None, port: int | None = None) -> None:
    """`frozenlm serve`: one process, one backbone (never several workers each loading the model)."""
    import uvicorn

    logs.configure()
    settings = Settings()
    if host:
        settings.host = host
    if port:
        settings.port = port
    app = create_app(settings)
    if app.state.runtime.keys.empty:
        if settings.host not in LOOPBACK and not settings.allow_open:
            log.warning("no API key is configured: binding to 127.0.0.1 instead of %s (set FROZENLM_ADMIN_KEY, "
                        "or FROZENLM_ALLOW_OPEN=true to serve open on the network)", settings.host)
            settings.host = "127.0.0.1"
        log.warning("no API key is configured: anyone who can reach %s may upload and delete tasks", settings.host)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=int(settings.request_timeout_s))
