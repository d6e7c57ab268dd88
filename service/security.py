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
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from service.errors import Forbidden, Unauthorized


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
