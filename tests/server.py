"""Start a real server in a subprocess on a free loopback port, for tests and benchmarks.

    with running_server({"FROZENLM_STORE_DIR": "/tmp/store"}) as url:
        Client(url).infer("base", "hi")
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(env: dict[str, str] | None = None, timeout: float = 300.0, log_path: Path | None = None):
    """Yield (url, process) of a `frozenlm serve` process that is ready; stop it (SIGTERM) afterwards.
    Its output goes to `log_path` when given (a test may read it), else to a temporary file."""
    from clients import Client

    port = free_port()
    full_env = {**os.environ, "FROZENLM_HOST": "127.0.0.1", "FROZENLM_PORT": str(port), "PYTHONUNBUFFERED": "1",
                **(env or {})}
    with (open(log_path, "w+b") if log_path else tempfile.TemporaryFile()) as log:
        proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve"], cwd=ROOT, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            with Client(url) as c:
                while not c.ready():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"server did not become ready:\n{log.read().decode()[-4000:]}")
                    time.sleep(0.3)
            yield url, proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def running_server(env: dict[str, str] | None = None, timeout: float = 300.0):
    """Yield the URL of a `frozenlm serve` process that is ready; stop it (SIGTERM) afterwards."""
    with server_process(env, timeout) as (url, _):
        yield url
