"""ModuleStore: module artifacts on disk, one folder per task, atomic versions.

    <store>/<name>/v<N>.module         the artifact bytes of version N, as uploaded
    <store>/<name>/v<N>.manifest.json  its manifest (`module.json`), so listing tasks never unpacks artifacts
    <store>/<name>/current.json        {"version", "sha256", "size_bytes", "kind"}: which version serves

A put writes the artifact and then its manifest each to a temporary file, fsyncs it, renames it
into place, then replaces `current.json` the same way and fsyncs the folder. A crash at any moment leaves `current.json`
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
_VERSION_FILE = re.compile(r"v(\d+)\.(?:module|manifest\.json)")
CURRENT = "current.json"


@dataclass(frozen=True)
class StoredModule:
    name: str
    version: int
    kind: str
    sha256: str
    size_bytes: int
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path.with_name(f"v{self.version}.manifest.json")


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it and rename it into place: a reader
    sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
                cur = read_json(p / CURRENT)
                for f in p.iterdir():  # versions written but never made current
                    m = _VERSION_FILE.fullmatch(f.name)
                    if m and (cur is None or int(m.group(1)) != cur.get("version")):
                        f.unlink(missing_ok=True)
                if cur is None and not any(p.iterdir()):
                    p.rmdir()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and valid_name(p.name) and (p / CURRENT).is_file())

    def get(self, name: str) -> StoredModule | None:
        if not valid_name(name):  # never a path outside the store ("..", "a/b")
            return None
        folder = self.root / name
        cur = read_json(folder / CURRENT)
        if cur is None:
            return None
        v = int(cur["version"])
        return StoredModule(name, v, cur.get("kind", "?"), cur.get("sha256", ""), int(cur.get("size_bytes", 0)),
                            folder / f"v{v}.module")

    def read(self, stored: StoredModule) -> bytes:
        return stored.path.read_bytes()

    def intact(self, stored: StoredModule) -> bool:
        """Whether the artifact's bytes still have the sha256 recorded at upload (read in chunks)."""
        h = hashlib.sha256()
        with open(stored.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == stored.sha256

    def read_manifest(self, stored: StoredModule) -> bytes:
        return stored.manifest_path.read_bytes()

    def write_manifest(self, stored: StoredModule, manifest: bytes) -> None:
        """Write the manifest of a version stored without one."""
        write_atomic(stored.manifest_path, manifest)

    def put(self, name: str, data: bytes, kind: str, manifest: bytes | None = None) -> StoredModule:
        """Store `data` (and its `manifest`) as the next version of `name` and make it current,
        atomically. Without a manifest the version is stored as before manifests were kept beside
        artifacts (the loaded-modules cache writes it at the next start)."""
        if not valid_name(name):
            raise ValueError(f"invalid task name {name!r}")
        with self._lock:
            folder = self.root / name
            folder.mkdir(exist_ok=True)
            old = self.get(name)
            existing = [int(m.group(1)) for f in folder.iterdir() if (m := _VERSION_FILE.fullmatch(f.name))]
            version = max(existing + [old.version if old else 0]) + 1
            sha = hashlib.sha256(data).hexdigest()
            stored = StoredModule(name, version, kind, sha, len(data), folder / f"v{version}.module")
            write_atomic(stored.path, data)
            if manifest is not None:
                write_atomic(stored.manifest_path, manifest)
            meta = {"version": version, "kind": kind, "sha256": sha, "size_bytes": len(data)}
            write_atomic(folder / CURRENT, json.dumps(meta).encode())
            fsync_dir(folder)
            if old is not None:  # in-flight requests hold the loaded module, not the files
                old.path.unlink(missing_ok=True)
                old.manifest_path.unlink(missing_ok=True)
            return stored

    def delete(self, name: str) -> bool:
        if not valid_name(name):
            return False
        with self._lock:
            folder = self.root / name
            if not (folder / CURRENT).is_file():
                return False
            trash = self.root / f".trash-{name}-{uuid.uuid4().hex}"
            os.replace(folder, trash)
            fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            return True
