"""Attacks on the store and on artifacts (issue 14: defects 4, 5, 7, 9) against a real server.

Each refused attack must get its status, leave `/readyz` at 200 and the store byte-for-byte as it
was; where memory was the harm, the server's peak memory may grow by less than 100 MB.
"""

from __future__ import annotations

import httpx
import pytest

from modules.base import kind_class
from tests.adversary import assert_ready, peak_growth_mb, served, store_digest


def _artifact(bb, p: int = 3) -> bytes:
    return kind_class("prompt").new(bb, {"num_virtual_tokens": p}, template="Q: {input}\nA:").to_artifact()


def _env(folder) -> dict[str, str]:
    return {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false"}


@pytest.fixture(scope="module")
def srv(tiny_served, tmp_path_factory):
    """One server for the attacks that need no restart, holding one task `keep`."""
    folder, bb = tiny_served
    with served(_env(folder), tmp_path_factory.mktemp("adv") / "store") as s:
        assert httpx.put(s.url + "/tasks/keep", content=_artifact(bb), timeout=60).status_code == 201
        yield s


def _refused(srv, name: str, body: bytes, status: int, code: str) -> float:
    """PUT `body` as `name`: the status and code, the store unchanged, still ready; the peak growth (MB)."""
    before = store_digest(srv.store)
    out = {}
    growth = peak_growth_mb(srv.pid, lambda: out.setdefault("r", httpx.put(srv.url + f"/tasks/{name}", content=body,
                                                                           timeout=120)))
    r = out["r"]
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert store_digest(srv.store) == before
    assert_ready(srv.url)
    return growth


# --- 9: names with a trailing newline ----------------------------------------------------------

@pytest.mark.parametrize("name", ["base%0A", "sst2%0A", "keep%0A", "keep%0D%0A"])
def test_a_name_with_a_trailing_newline_is_refused(srv, tiny_served, name):
    _refused(srv, name, _artifact(tiny_served[1]), 422, "invalid_name")
    assert httpx.post(srv.url + f"/tasks/{name}/infer", json={"inputs": "x"}).status_code == 404
    assert [t["name"] for t in httpx.get(srv.url + "/tasks").json()["tasks"]] == ["keep"]
