"""Attacks on the store and on artifacts (issue 14: defects 4, 5, 7, 9) against a real server.

Each refused attack must get its status, leave `/readyz` at 200 and the store byte-for-byte as it
was; where memory was the harm, the server's peak memory may grow by less than 100 MB.
"""

from __future__ import annotations

import gzip
import io
import zipfile

import httpx
import pytest

from modules.registry import kind_class
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


# --- 4, 7: damaged archives --------------------------------------------------------------------

def _member_data(blob: bytes, name: str) -> int:
    """Where the stored (compressed) bytes of zip member `name` start in `blob`."""
    import struct

    info = zipfile.ZipFile(io.BytesIO(blob)).getinfo(name)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(blob: bytes, at: int, n: int = 40) -> bytes:
    """`blob` with the `n` bytes from `at` inverted (near the start of a deflate stream: its code
    tables, so inflating fails; further in, only the CRC tells)."""
    return blob[:at] + bytes(b ^ 0xFF for b in blob[at:at + n]) + blob[at + n:]


def _restored(blob: bytes, compression: int) -> bytes:
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, zipfile.ZipFile(out, "w", compression=compression) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    return out.getvalue()


def _tar_gz(blob: bytes) -> bytes:
    import tarfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(blob)) as src, tarfile.open(fileobj=out, mode="w:gz") as t:
        for info in src.infolist():
            member = tarfile.TarInfo(info.filename)
            member.size = info.file_size
            t.addfile(member, io.BytesIO(src.read(info)))
    return out.getvalue()


def _damaged(kind: str, bb) -> bytes:
    blob = _artifact(bb, p=40)  # 40 x 64 float32 weights: 10 kB
    tgz = _tar_gz(blob)
    weights = "weights.safetensors"
    return {
        "zip_deflate_flipped": lambda: _flip(blob, _member_data(blob, weights) + 10),  # zlib error -3
        "zip_stored_flipped": lambda: (lambda b: _flip(b, _member_data(b, weights) + 1000))(
            _restored(blob, zipfile.ZIP_STORED)),  # bad CRC-32
        "zip_bzip2_flipped": lambda: (lambda b: _flip(b, _member_data(b, weights) + 10))(
            _restored(blob, zipfile.ZIP_BZIP2)),
        "zip_truncated": lambda: blob[:len(blob) // 2],
        "tgz_bad_crc": lambda: tgz[:-8] + bytes(b ^ 0xFF for b in tgz[-8:-4]) + tgz[-4:],
        "tgz_bad_length": lambda: tgz[:-4] + (int.from_bytes(tgz[-4:], "little") + 1).to_bytes(4, "little"),
        "tgz_flipped": lambda: _flip(tgz, 20),
        "tgz_truncated": lambda: tgz[:-100],
        "tgz_trailing_garbage": lambda: tgz + b"garbage!",
        "gz_not_a_tar": lambda: gzip.compress(b"not a tar archive " * 100),
    }[kind]()


@pytest.mark.parametrize("kind", ["zip_deflate_flipped", "zip_stored_flipped", "zip_truncated", "zip_bzip2_flipped",
                                  "tgz_bad_crc", "tgz_bad_length", "tgz_flipped", "tgz_truncated",
                                  "tgz_trailing_garbage", "gz_not_a_tar"])
def test_a_damaged_archive_is_refused(srv, tiny_served, kind):
    _refused(srv, "damaged", _damaged(kind, tiny_served[1]), 422, "invalid_artifact")


def test_a_good_tar_gz_is_accepted(srv, tiny_served):
    r = httpx.put(srv.url + "/tasks/tgz", content=_tar_gz(_artifact(tiny_served[1], p=40)), timeout=60)
    assert r.status_code == 201, r.text
    assert httpx.delete(srv.url + "/tasks/tgz").status_code == 204


def test_a_corrupt_stored_artifact_makes_only_its_task_unavailable(tiny_served, tmp_path):
    folder, bb = tiny_served
    store = tmp_path / "store"
    with served(_env(folder), store) as s:
        for name in ("good", "bad"):
            assert httpx.put(s.url + f"/tasks/{name}", content=_artifact(bb, p=40), timeout=60).status_code == 201
        want = httpx.post(s.url + "/tasks/good/infer", json={"inputs": "hi"}, timeout=60).json()["outputs"]
    path = store / "bad" / "v1.module"
    blob = path.read_bytes()
    path.write_bytes(_flip(blob, _member_data(blob, "weights.safetensors") + 10))
    with served(_env(folder), store) as s:
        assert_ready(s.url)
        listed = {}
        growth = peak_growth_mb(s.pid, lambda: listed.update(httpx.get(s.url + "/tasks").json()))
        assert growth < 100, growth
        tasks = {t["name"]: t for t in listed["tasks"]}
        assert (tasks["good"]["status"], tasks["bad"]["status"]) == ("ready", "unavailable")
        assert tasks["bad"]["error"]
        # listed from the manifest kept beside the artifact: the corrupt artifact is never unpacked to list it
        assert tasks["bad"]["manifest"]["kind"] == tasks["good"]["manifest"]["kind"] == "prompt"
        assert [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]] == ["base", "good"]
        assert httpx.post(s.url + "/tasks/good/infer", json={"inputs": "hi"}, timeout=60).json()["outputs"] == want
        r = httpx.post(s.url + "/tasks/bad/infer", json={"inputs": "hi"}, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "task_unavailable"


# --- 5: what an artifact may hold, and how far it may unpack --------------------------------------

_BOMB = 400 << 20  # 400 MB of zeros: a few hundred kB once deflated


def _with_zeros(files: dict[str, bytes], name: str, head: bytes, zeros: int) -> bytes:
    """A zip of `files` plus member `name`: `head` then `zeros` zero bytes (written in chunks)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
        with z.open(name, "w", force_zip64=True) as f:
            f.write(head)
            for _ in range(zeros >> 20):
                f.write(bytes(1 << 20))
    return out.getvalue()


def _safetensors_head(shape: list[int], data_bytes: int) -> bytes:
    import json

    header = json.dumps({"prompt.embeddings": {"dtype": "F32", "shape": shape, "data_offsets": [0, data_bytes]}})
    return len(header).to_bytes(8, "little") + header.encode()


def _files(bb) -> dict[str, bytes]:
    from modules.core.artifact import read_artifact

    return read_artifact(_artifact(bb))


@pytest.mark.parametrize("kind,status", [("extra_file", 413), ("weights", 413)])
def test_a_zip_bomb_is_refused_before_it_unpacks(srv, tiny_served, kind, status):
    files = _files(tiny_served[1])
    if kind == "extra_file":
        bomb = _with_zeros(files, "zeros", b"", _BOMB)
    else:  # a weights file whose header declares 400 MB of tensor data, all zeros
        files.pop("weights.safetensors")
        bomb = _with_zeros(files, "weights.safetensors", _safetensors_head([_BOMB // 256, 64], _BOMB), _BOMB)
    assert len(bomb) < 1 << 20
    growth = _refused(srv, "bomb", bomb, status, "artifact_too_large")
    assert growth < 100, growth


def _zip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return out.getvalue()


def _unnamed(kind: str, bb) -> tuple[bytes, int, str]:
    files = _files(bb)
    weights = files["weights.safetensors"]
    return {
        "extra_file": lambda: (_zip({**files, "notes.txt": b"hello"}), 422, "invalid_artifact"),
        "extra_folder_file": lambda: (_zip({**files, "extra/weights.safetensors": weights}), 422, "invalid_artifact"),
        "big_manifest": lambda: (_zip({**files, "module.json": files["module.json"] + b" " * (2 << 20)}), 413,
                                 "artifact_too_large"),
        "weights_longer_than_declared": lambda: (_zip({**files, "weights.safetensors": weights + bytes(64)}), 422,
                                                 "invalid_artifact"),
        "weights_shorter_than_declared": lambda: (_zip({**files, "weights.safetensors": weights[:-64]}), 422,
                                                  "invalid_artifact"),
        "weights_header_past_the_end": lambda: (_zip({**files, "weights.safetensors": (1 << 40).to_bytes(8, "little")}),
                                                422, "invalid_artifact"),
    }[kind]()


@pytest.mark.parametrize("kind", ["extra_file", "extra_folder_file", "big_manifest", "weights_longer_than_declared",
                                  "weights_shorter_than_declared", "weights_header_past_the_end"])
def test_files_the_format_does_not_name_are_refused(srv, tiny_served, kind):
    body, status, code = _unnamed(kind, tiny_served[1])
    _refused(srv, "unnamed", body, status, code)


def test_a_folder_of_named_files_is_accepted(srv, tiny_served):
    files = _files(tiny_served[1])
    r = httpx.put(srv.url + "/tasks/folder", content=_zip({f"m/{n}": b for n, b in files.items()}), timeout=60)
    assert r.status_code == 201, r.text
    assert httpx.delete(srv.url + "/tasks/folder").status_code == 204


# --- the earlier hostile corpus (tests/test_api.py), now against a real server --------------------

@pytest.mark.parametrize("kind,status,code", [
    ("dotdot", 422, "invalid_artifact"), ("absolute", 422, "invalid_artifact"), ("zip_link", 422, "invalid_artifact"),
    ("tar_link", 422, "invalid_artifact"), ("tar_device", 422, "invalid_artifact"),
    ("too_many_files", 422, "invalid_artifact"), ("zip_bomb", 413, "artifact_too_large"),
    ("pickle_only", 422, "invalid_artifact"), ("no_manifest", 422, "invalid_artifact")])
def test_the_earlier_hostile_corpus_is_refused(srv, tiny_served, kind, status, code):
    from tests.test_api import _hostile

    assert _refused(srv, "t", _hostile(kind, tiny_served[1]), status, code) < 100
