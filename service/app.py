"""create_app(settings): the FastAPI app. The backbone loads in a background thread at start-up,
so /healthz answers at once and /readyz turns 200 when the model is ready. `run` serves it with
uvicorn, bounding connections, headers and idle time."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import h11
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service import errors, logs
from service.api import documents, health, infer, openai, tasks
from service.config import Settings
from service.runtime import Runtime
from service.security import BodyGate

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
    app.add_middleware(BodyGate, settings=settings)
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
                timeout_graceful_shutdown=int(settings.request_timeout_s),
                http=_protocol(settings.header_timeout_s), limit_concurrency=settings.max_connections,
                timeout_keep_alive=max(1, int(settings.header_timeout_s)),
                h11_max_incomplete_event_size=settings.max_header_bytes)


def _protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request's headers
    within `header_timeout_s` of opening or of its previous response (uvicorn alone waits forever
    for a connection that sends nothing, or a byte at a time)."""

    class Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol
