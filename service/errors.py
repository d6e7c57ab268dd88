"""One error contract: domain errors carry an HTTP status and a code; one handler renders them
as {"error": {"code", "message"}}. Anything unexpected becomes a generic 500 and a logged traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.core.artifact import ArtifactError, ArtifactTooLarge
from modules.core.module import BackboneMismatch

log = logging.getLogger("frozenlm.errors")


class ServiceError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.headers = headers


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Invalid(ServiceError):
    status, code = 422, "invalid"


class ClientGone(ServiceError):
    """The client went away before its answer: nothing is sent (499, as nginx logs it)."""

    status, code = 499, "client_closed_request"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class Timeout(ServiceError):
    status, code = 504, "timeout"


def from_artifact_error(e: ArtifactError) -> ServiceError:
    if isinstance(e, ArtifactTooLarge):
        return TooLarge(str(e), code="artifact_too_large")
    if isinstance(e, BackboneMismatch):
        return Conflict(str(e), code="backbone_mismatch")
    return Invalid(str(e), code="invalid_artifact")


def _body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "body_timeout", 413: "body_too_large"}


def response(e: ServiceError | StarletteHTTPException) -> JSONResponse:
    """The error body and status of a domain error or an HTTP exception."""
    if isinstance(e, ServiceError):
        return JSONResponse(_body(e.code, e.message), status_code=e.status, headers=e.headers)
    code = HTTP_CODES.get(e.status_code, "http_error")
    return JSONResponse(_body(code, str(e.detail)), status_code=e.status_code, headers=e.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    @app.exception_handler(StarletteHTTPException)
    async def _known(_: Request, e: ServiceError | StarletteHTTPException):
        return response(e)

    @app.exception_handler(ValidationError)  # a model built inside a route from request fields
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError | ValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(_body("invalid_request", "; ".join(parts)[:2000]), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(_body("internal_error", "internal server error"), status_code=500)
