"""API keys. With FROZENLM_ADMIN_KEY set, uploads and deletes need `Authorization: Bearer <key>`
(401 without a key, 403 with a wrong one); keys are compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Forbidden, Unauthorized


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def require_admin(request: Request) -> None:
    key = request.app.state.runtime.settings.admin_key
    if not key:
        return
    token = bearer(request)
    if token is None:
        raise Unauthorized("this endpoint needs an admin key: Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise Forbidden("this key may not upload or delete tasks")
