"""Structured logs (one JSON object a line) and the request id middleware.

Every response carries `X-Request-ID` (the client's own, if it sent a sane one); the access log
line of that request has the same id.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from fastapi import FastAPI

_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access = logging.getLogger("frozenlm.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming and client-disconnect detection pass through."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex[:16]
        start, status = time.monotonic(), 0

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            access.info("%s %s %d", scope.get("method"), path, status,
                        extra={"fields": {"request_id": rid, "method": scope.get("method"), "path": path,
                                          "status": status, "ms": round((time.monotonic() - start) * 1e3, 2)}})


def install(app: FastAPI) -> None:
    app.add_middleware(RequestIdMiddleware)
