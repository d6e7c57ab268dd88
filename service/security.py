"""API keys and scopes.

Keys come from `FROZENLM_ADMIN_KEY` (scope `admin`) and from a keys file
(`FROZENLM_API_KEYS_FILE`, JSON: `[{"name": "team-a", "key": "...", "scopes": ["infer:sst2"]}]`).
Scopes: `admin` (upload, delete, and inference on every task), `infer:*` (inference on every task),
`infer:<task>` (inference on that task). Requests send `Authorization: Bearer <key>`.

- Uploads and deletes need an admin key whenever any key is configured.
- Inference needs a key with a matching scope once any inference key is configured; with an
  admin key alone, inference stays open.
- Listing tasks and the backbone needs any valid key once any key is configured.
- 401 without a (known) key, 403 with a key that lacks the scope. Keys are compared in constant time.

`BodyGate` checks the key of every request that carries a body before one byte of the body is read,
and bounds the body's size and the time it may take to arrive.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from starlette.exceptions import HTTPException

from service.errors import Forbidden, ServiceError, Unauthorized, response


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    def may_infer(self, task: str) -> bool:
        return bool({"admin", "infer:*", f"infer:{task}"} & self.scopes)


class KeyRing:
    def __init__(self, admin_key: str | None = None, keys_file: Path | None = None):
        self._keys: list[tuple[bytes, Principal]] = []
        if admin_key:
            self._keys.append((admin_key.encode(), Principal("admin", frozenset({"admin"}))))
        if keys_file:
            try:
                entries = json.loads(Path(keys_file).read_text())
                for e in entries:
                    scopes = frozenset(e["scopes"])
                    bad = [s for s in scopes if s != "admin" and not s.startswith("infer:")]
                    if bad or not e["key"]:
                        raise ValueError(f"bad scopes {bad} or empty key")
                    self._keys.append((e["key"].encode(), Principal(e.get("name", "key"), scopes)))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"cannot read API keys file {keys_file}: {err}") from err
        self.infer_protected = any(not p.scopes <= {"admin"} for _, p in self._keys)

    @property
    def empty(self) -> bool:
        return not self._keys

    def authenticate(self, token: str | None) -> Principal | None:
        """The key's principal; every configured key is compared, in constant time."""
        if token is None:
            return None
        found = None
        given = token.encode()
        for key, principal in self._keys:
            if hmac.compare_digest(given, key):
                found = principal
        return found


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def caller(request: Request) -> str:
    """Who sent a request, for the queue's turns (service/scheduler.py): the name of the key it
    carries when the key is known, else its client's address."""
    principal = request.app.state.runtime.keys.authenticate(bearer(request))
    if principal is not None:
        return f"key {principal.name}"
    return f"address {request.client.host if request.client else '-'}"


def _principal(request: Request) -> Principal:
    principal = request.app.state.runtime.keys.authenticate(bearer(request))
    if principal is None:
        raise Unauthorized("a valid API key is needed: Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_admin(request: Request) -> None:
    if request.app.state.runtime.keys.empty:
        return
    if "admin" not in _principal(request).scopes:
        raise Forbidden("this key may not upload or delete tasks (needs scope 'admin')")


def require_reader(request: Request) -> None:
    if not request.app.state.runtime.keys.empty:
        _principal(request)


def require_infer(request: Request, name: str) -> None:
    keys = request.app.state.runtime.keys
    if not keys.infer_protected:
        return
    if not _principal(request).may_infer(name):
        raise Forbidden(f"this key may not run task {name!r} (needs scope 'infer:{name}' or 'infer:*')")


UPLOAD_PATH = re.compile(r"/tasks/[^/]+(/documents)?")  # artifacts and documents: their routes cap them
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _require_body_key(request: Request) -> None:
    """The key check of a request that carries a body, before the body is read: the check of its
    route (an OpenAI route names its task in the body, so any inference key passes here and the
    route checks the task's scope after parsing)."""
    parts = request.url.path.strip("/").split("/")
    if parts[0] == "v1":
        if request.app.state.runtime.keys.infer_protected:
            _principal(request)
    elif len(parts) == 3 and parts[0] == "tasks" and parts[2] == "infer":
        require_infer(request, parts[1])
    else:
        require_admin(request)


class BodyGate:
    """ASGI middleware for POST, PUT and PATCH: 401/403 before the body is read; 413 for a JSON body
    over `max_body_bytes` (from its Content-Length, or counted as a chunked body arrives); 408, and
    the connection closed, when the body takes longer than `body_timeout_s` to arrive."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        request = Request(scope)
        limit = None if UPLOAD_PATH.fullmatch(scope["path"]) else self.settings.max_body_bytes
        try:
            _require_body_key(request)
            declared = request.headers.get("content-length", "")
            if limit is not None and declared.isdigit() and int(declared) > limit:
                raise HTTPException(413, f"body is {declared} bytes; the limit is {limit}", _CLOSE)
        except (ServiceError, HTTPException) as e:
            return await response(e)(scope, receive, send)
        return await self.app(scope, _bounded(receive, limit, self.settings.body_timeout_s), send)


_CLOSE = {"Connection": "close"}


def _bounded(receive, limit: int | None, timeout: float):
    """`receive` that raises 413 past `limit` body bytes and 408 past `timeout` seconds for the
    whole body; once the body is complete, it passes messages through (disconnect watching)."""
    deadline = asyncio.get_running_loop().time() + timeout
    received, complete = 0, False

    async def bounded():
        nonlocal received, complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise HTTPException(408, f"the body did not arrive within {timeout:g}s", _CLOSE) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if limit is not None and received > limit:
                raise HTTPException(413, f"body is over the limit of {limit} bytes", _CLOSE)
        return message

    return bounded
