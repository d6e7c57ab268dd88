"""Tools for adversarial tests against a real server: the server's process, its peak memory
around one request, and a digest of its store (a refused request must leave it byte-for-byte
unchanged).

    with served(env) as srv:
        growth = peak_growth_mb(srv.pid, lambda: httpx.post(srv.url + "/tasks/x/infer", ...))
        assert growth < 100
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server import server_process

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Served:
    url: str
    pid: int
    store: Path


@contextmanager
def served(env: dict[str, str], store: Path, timeout: float = 300.0):
    """A real `frozenlm serve` process on a free loopback port with its store at `store`, ready;
    SIGTERM afterwards."""
    with server_process({"FROZENLM_STORE_DIR": str(store), **env}, timeout) as (url, proc):
        yield Served(url, proc.pid, store)


def assert_ready(url: str) -> None:
    r = httpx.get(url + "/readyz", timeout=10)
    assert r.status_code == 200, r.text


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth_mb(pid: int, action) -> float:
    """How far the process's peak resident memory rose above its resident memory before `action()`
    ran (MB). The kernel's high-water mark is reset first (clear_refs 5), so an earlier peak (model
    loading) cannot hide a spike."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = _status_kb(pid, "VmRSS")
    action()
    return (_status_kb(pid, "VmHWM") - before) / 1024


def store_digest(store: Path) -> str:
    """sha256 over every file's relative path and bytes under the store (sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(store).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(store)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()
