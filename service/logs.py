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

from fastapi import FastAPI, Request

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


def install(app: FastAPI) -> None:
    @app.middleware("http")
    async def request_id(request: Request, call_next):
        given = request.headers.get("x-request-id", "")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex[:16]
        start = time.monotonic()
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        access.info("%s %s %d", request.method, request.url.path, response.status_code,
                    extra={"fields": {"request_id": rid, "method": request.method, "path": request.url.path,
                                      "status": response.status_code,
                                      "ms": round((time.monotonic() - start) * 1e3, 2)}})
        return response
