"""ModuleStore: module artifacts on disk, one folder per task, atomic versions.

    <store>/<name>/v<N>.module   the artifact bytes of version N, as uploaded
    <store>/<name>/current.json  {"version", "sha256", "size_bytes", "kind"}: which version serves

A put writes the artifact to a temporary file, fsyncs it, renames it into place, then replaces
`current.json` the same way and fsyncs the folder. A crash at any moment leaves `current.json`
pointing at a complete artifact (the old or the new one); leftovers are cleaned at the next start.
A delete renames the folder away first, so it is atomic too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from service.schemas import NAME_PATTERN

log = logging.getLogger("frozenlm.store")

_NAME = re.compile(NAME_PATTERN)
_VERSION_FILE = re.compile(r"^v(\d+)\.module$")
CURRENT = "current.json"


@dataclass(frozen=True)
class StoredModule:
    name: str
    version: int
    kind: str
    sha256: str
    size_bytes: int
    path: Path


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ModuleStore:
    """Artifacts on disk. Thread-safe; a name that is not valid (see `valid_name`) is never a path."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._clean()

    def _clean(self) -> None:
        """Remove what an interrupted put or delete left behind."""
        for p in self.root.iterdir():
            if p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir():
                for f in p.iterdir():
                    if f.name.endswith(".tmp"):
                        f.unlink(missing_ok=True)
                cur = self._read_current(p)
                for f in p.iterdir():  # versions written but never made current
                    m = _VERSION_FILE.match(f.name)
                    if m and (cur is None or int(m.group(1)) != cur.get("version")):
                        f.unlink(missing_ok=True)
                if cur is None and not any(p.iterdir()):
                    p.rmdir()

    @staticmethod
    def _read_current(folder: Path) -> dict | None:
        try:
            return json.loads((folder / CURRENT).read_text())
        except (OSError, ValueError):
            return None

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and valid_name(p.name) and (p / CURRENT).is_file())

    def get(self, name: str) -> StoredModule | None:
        if not valid_name(name):  # never a path outside the store ("..", "a/b")
            return None
        folder = self.root / name
        cur = self._read_current(folder)
        if cur is None:
            return None
        v = int(cur["version"])
        return StoredModule(name, v, cur.get("kind", "?"), cur.get("sha256", ""), int(cur.get("size_bytes", 0)),
                            folder / f"v{v}.module")

    def read(self, stored: StoredModule) -> bytes:
        return stored.path.read_bytes()

    def put(self, name: str, data: bytes, kind: str) -> StoredModule:
        """Store `data` as the next version of `name` and make it current, atomically."""
        if not valid_name(name):
            raise ValueError(f"invalid task name {name!r}")
        with self._lock:
            folder = self.root / name
            folder.mkdir(exist_ok=True)
            old = self.get(name)
            existing = [int(m.group(1)) for f in folder.iterdir() if (m := _VERSION_FILE.match(f.name))]
            version = max(existing + [old.version if old else 0]) + 1
            sha = hashlib.sha256(data).hexdigest()
            path = folder / f"v{version}.module"
            _write_atomic(path, data)
            meta = {"version": version, "kind": kind, "sha256": sha, "size_bytes": len(data)}
            _write_atomic(folder / CURRENT, json.dumps(meta).encode())
            _fsync_dir(folder)
            if old is not None and old.path != path:
                old.path.unlink(missing_ok=True)  # in-flight requests hold the loaded module, not the file
            return StoredModule(name, version, kind, sha, len(data), path)

    def delete(self, name: str) -> bool:
        if not valid_name(name):
            return False
        with self._lock:
            folder = self.root / name
            if not (folder / CURRENT).is_file():
                return False
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            os.replace(folder, trash)
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            return True
