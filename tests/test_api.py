"""The HTTP contract, in-process on the tiny backbone (statuses, error bodies, store safety)."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient

from modules.core.artifact import read_artifact
from modules.registry import kind_class, load_module
from service.app import create_app
from service.config import Settings
from tests.conftest import tiny_backbone

LABELS = {"neg": " bad", "pos": " good"}


@pytest.fixture()
def app_client(tmp_path, tiny):
    settings = Settings(store_dir=tmp_path / "store", examples=False, admin_key="sekret", max_input_tokens=64,
                        max_new_tokens=32, max_upload_bytes=200_000, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as client:
        yield client


ADMIN = {"Authorization": "Bearer sekret"}


def _artifact(tiny, labels=None, p=3):
    m = kind_class("prompt").new(tiny, {"num_virtual_tokens": p}, template="Q: {input}\nA:", labels=labels)
    return m.to_artifact()


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.read_bytes()) for p in root.rglob("*") if p.is_file())


def test_health_ready_backbone(app_client, tiny):
    assert app_client.get("/healthz").json() == {"status": "ok"}
    assert app_client.get("/readyz").status_code == 200
    assert app_client.get("/backbone").status_code == 401  # a key exists: reads need one
    bb = app_client.get("/backbone", headers=ADMIN).json()
    assert bb["fingerprint"] == tiny.info.fingerprint and bb["hidden_size"] == 64 and bb["device"] == "cpu"


def test_upload_list_get_infer_replace_delete(app_client, tiny):
    r = app_client.put("/tasks/cls", content=_artifact(tiny, LABELS), headers=ADMIN)
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["version"] == 1 and up["kind"] == "prompt" and len(up["sha256"]) == 64
    assert [t["name"] for t in app_client.get("/tasks", headers=ADMIN).json()["tasks"]] == ["cls"]
    got = app_client.get("/tasks/cls", headers=ADMIN).json()
    assert got["manifest"]["labels"] == LABELS and got["status"] == "ready"

    out = app_client.post("/tasks/cls/infer", json={"inputs": ["hello", "a longer input text"]}).json()
    assert out["task"] == "cls" and out["version"] == 1 and len(out["outputs"]) == 2
    for o in out["outputs"]:
        assert o["label"] in LABELS and o["finish_reason"] == "label"
        assert sum(o["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert o["label"] == max(o["scores"], key=o["scores"].get)

    r = app_client.put("/tasks/cls", files={"file": ("m.zip", _artifact(tiny), "application/zip")}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["version"] == 2
    gen = app_client.post("/tasks/cls/infer", json={"inputs": "hi", "parameters": {"max_new_tokens": 5}}).json()
    assert gen["version"] == 2 and "label" not in gen["outputs"][0]
    assert gen["usage"]["completion_tokens"] <= 5 and set(gen["timings_ms"]) == {"queue", "inference", "total"}

    assert app_client.delete("/tasks/cls", headers=ADMIN).status_code == 204
    assert app_client.get("/tasks/cls", headers=ADMIN).status_code == 404
    assert app_client.post("/tasks/cls/infer", json={"inputs": "x"}).status_code == 404


def test_base_task_answers_and_is_reserved(app_client):
    out = app_client.post("/tasks/base/infer", json={"inputs": "hi", "parameters": {"max_new_tokens": 4}})
    assert out.status_code == 200 and out.json()["version"] == 0
    assert app_client.put("/tasks/base", content=b"x", headers=ADMIN).status_code == 409
    assert app_client.delete("/tasks/base", headers=ADMIN).status_code == 409


def _zip(entries: dict[str, bytes], link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symlink
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _tar(entries: dict[str, bytes], special: str | None = None) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if special:
            info = tarfile.TarInfo(special)
            info.type = tarfile.SYMTYPE if special == "link" else tarfile.CHRTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)
    return buf.getvalue()


def _hostile(kind: str, tiny) -> bytes:
    good = read_artifact(_artifact(tiny))
    return {
        "dotdot": lambda: _zip({**good, "../evil": b"x"}),
        "absolute": lambda: _zip({**good, "/etc/cron.d/evil": b"x"}),
        "zip_link": lambda: _zip(good, link="weights.link"),
        "tar_link": lambda: _tar(good, special="link"),
        "tar_device": lambda: _tar(good, special="dev"),
        "too_many_files": lambda: _zip({**good, **{f"f{i}": b"" for i in range(80)}}),
        "zip_bomb": lambda: _zip({**good, "zeros": bytes(20_000_000)}),  # 20 kB packed, 20 MB unpacked
        "pickle_only": lambda: _zip({"module.json": good["module.json"], "weights.pt": b"\x80\x04."}),
        "no_manifest": lambda: _zip({"weights.safetensors": good["weights.safetensors"]}),
    }[kind]()


@pytest.mark.parametrize("name,body,status,code", [
    ("t", b"not an archive", 422, "invalid_artifact"),
    ("t", "dotdot", 422, "invalid_artifact"),
    ("t", "absolute", 422, "invalid_artifact"),
    ("t", "zip_link", 422, "invalid_artifact"),
    ("t", "tar_link", 422, "invalid_artifact"),
    ("t", "tar_device", 422, "invalid_artifact"),
    ("t", "too_many_files", 422, "invalid_artifact"),
    ("t", "zip_bomb", 413, "artifact_too_large"),
    ("t", "pickle_only", 422, "invalid_artifact"),
    ("t", "no_manifest", 422, "invalid_artifact"),
    ("t", "other_backbone", 409, "backbone_mismatch"),
    ("Bad/Name", "good", 404, None),  # a slash is another route
    ("UPPER", "good", 422, "invalid_name"),
    ("t", b"x" * 300_000, 413, "artifact_too_large"),
    ("t", b"", 422, "invalid_request"),
])
def test_refused_uploads_leave_the_store_unchanged(app_client, tiny, tmp_path, name, body, status, code):
    assert app_client.put("/tasks/keep", content=_artifact(tiny), headers=ADMIN).status_code == 201
    before = _snapshot(tmp_path / "store")
    if body == "good":
        body = _artifact(tiny)
    elif body == "other_backbone":
        body = _artifact(tiny_backbone(seed=3))
    elif isinstance(body, str):
        body = _hostile(body, tiny)
    r = app_client.put(f"/tasks/{name}", content=body, headers=ADMIN)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert _snapshot(tmp_path / "store") == before
    assert [t["name"] for t in app_client.get("/tasks", headers=ADMIN).json()["tasks"]] == ["keep"]


def test_admin_key_is_required_for_writes(app_client, tiny):
    art = _artifact(tiny)
    assert app_client.put("/tasks/t", content=art).status_code == 401
    assert app_client.put("/tasks/t", content=art, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert app_client.delete("/tasks/t").status_code == 401
    assert app_client.get("/tasks").status_code == 401  # a key exists: reads need one
    assert app_client.get("/tasks", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("body,status", [
    ({"inputz": "x"}, 422),
    ({"inputs": 5}, 422),
    ({"inputs": []}, 422),
    ({"inputs": "x", "parameters": {"temperature": -1}}, 422),
    ({"inputs": "x", "parameters": {"max_new_tokens": 33}}, 422),
    ({"inputs": "x", "parameters": {"unknown": 1}}, 422),
    ({"inputs": "word " * 200}, 413),
    ({"inputs": ["a", "b"], "stream": True}, 422),
])
def test_bad_inference_requests(app_client, body, status):
    r = app_client.post("/tasks/base/infer", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message"}


def test_malformed_json_and_unknown_routes(app_client):
    r = app_client.post("/tasks/base/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert app_client.get("/nope").json()["error"]["code"] == "not_found"
    assert app_client.post("/tasks/nope/infer", json={"inputs": "x"}).json()["error"]["code"] == "task_not_found"


def test_stream_returns_the_same_text_as_a_plain_call(app_client):
    body = {"inputs": "tell me", "parameters": {"max_new_tokens": 12}}
    plain = app_client.post("/tasks/base/infer", json=body).json()["outputs"][0]["text"]
    with app_client.stream("POST", "/tasks/base/infer", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    import json as _json

    pieces = [_json.loads(line[5:])["text"] for line in lines[:-1]]
    done = _json.loads(lines[-1][5:])
    assert "".join(pieces) == plain == done["outputs"][0]["text"]


def test_metrics_count_requests(app_client):
    app_client.post("/tasks/base/infer", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    text = app_client.get("/metrics").text
    assert 'frozenlm_requests_total{kind="base",outcome="ok",task="base"}' in text
    assert "frozenlm_batch_rows_count" in text


def test_module_cache_tiers_pinning_and_counts(tmp_path, tiny):
    from service.loaded import LoadedModules
    from service.store import ModuleStore

    arts = {f"t{i}": _artifact(tiny, p=4) for i in range(4)}
    nbytes = 4 * 64 * 4  # one module: 4 x 64 float32
    reg = LoadedModules(ModuleStore(tmp_path), tiny, cache_bytes=2 * nbytes, host_cache_bytes=1 * nbytes,
                   pinned=frozenset({"t0"}))
    for name, blob in arts.items():
        reg.put(name, blob)  # a put loads the module too
    assert reg.loaded_count == 2 and reg.stats["evictions"] == 1  # t0 pinned; t1 parked then dropped by t2
    t0 = reg.resolve("t0").module
    assert reg.stats["hits"] == 1 and reg.resolve("t0").module is t0
    reg.resolve("t2")  # parked on the CPU tier: rebuilt on the device without the store
    assert reg.stats["warm_loads"] == 1
    before = reg.stats["cold_loads"]
    reg.resolve("t1")  # dropped from both tiers: back from the store
    assert reg.stats["cold_loads"] == before + 1
    assert "t0" in {k[0] for k in reg._loaded}  # the pinned task never left the device
    torch.testing.assert_close(reg.resolve("t2").module.embeddings,
                               load_module(read_artifact(arts["t2"]), tiny).embeddings, rtol=0, atol=0)


def test_keys_file_scopes_guard_inference_per_task(tmp_path, tiny):
    import json

    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"name": "a", "key": "key-a", "scopes": ["infer:one"]},
                                {"name": "all", "key": "key-all", "scopes": ["infer:*"]}]))
    settings = Settings(store_dir=tmp_path / "store", examples=False, admin_key="sekret", api_keys_file=keys,
                        _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        for name in ("one", "two"):
            assert c.put(f"/tasks/{name}", content=_artifact(tiny, LABELS), headers=ADMIN).status_code == 201
        body = {"inputs": "x"}

        def status(task, key=None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return c.post(f"/tasks/{task}/infer", json=body, headers=headers).status_code

        assert status("one") == 401 and status("one", "nope") == 401
        assert status("one", "key-a") == 200 and status("two", "key-a") == 403
        assert status("two", "key-all") == 200 and status("two", "sekret") == 200
        assert c.put("/tasks/three", content=_artifact(tiny), headers={"Authorization": "Bearer key-all"}).status_code == 403
        assert c.get("/tasks").status_code == 401
        assert c.get("/tasks", headers={"Authorization": "Bearer key-a"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200


def test_no_keys_means_loopback_only(monkeypatch, tmp_path):
    import service.app as app_module

    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, **kw: seen.update(host=host))
    monkeypatch.setattr(app_module, "Settings", lambda: Settings(host="0.0.0.0", store_dir=tmp_path, _env_file=None))
    app_module.run()
    assert seen["host"] == "127.0.0.1"
    monkeypatch.setattr(app_module, "Settings",
                        lambda: Settings(host="0.0.0.0", store_dir=tmp_path, admin_key="k", _env_file=None))
    app_module.run()
    assert seen["host"] == "0.0.0.0"


def test_request_id_is_echoed(app_client):
    r = app_client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = app_client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 16 and generated != app_client.get("/healthz").headers["x-request-id"]
    assert app_client.get("/healthz", headers={"X-Request-ID": "bad id\n!"}).headers["x-request-id"] != "bad id\n!"


def test_full_queue_answers_429_with_retry_after(tmp_path, tiny, monkeypatch):
    from service.scheduler import Job, Scheduler

    monkeypatch.setattr(Scheduler, "next_batch", lambda self, *a, **k: time.sleep(0.01) or [])  # nothing leaves the queue
    settings = Settings(store_dir=tmp_path, examples=False, max_queue=2, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        c.app.state.runtime.scheduler.submit([Job(None, [], None, 1) for _ in range(2)])
        r = c.post("/tasks/base/infer", json={"inputs": "a"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"


def test_a_request_that_can_never_fit_is_413_not_429(tmp_path, tiny):
    settings = Settings(store_dir=tmp_path, examples=False, max_queue=2, max_batch_tokens=40, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        for body in ({"inputs": ["a", "b", "c"]},  # more rows than the queue holds
                     {"inputs": "a", "parameters": {"max_new_tokens": 32}},  # over a batch's token budget
                     {"inputs": "a", "parameters": {"max_new_tokens": 32}, "stream": True}):  # before any event
            r = c.post("/tasks/base/infer", json=body)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
        assert c.post("/tasks/base/infer", json={"inputs": ["a", "b"], "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_deadline_answers_504_and_cancels_the_rows(tmp_path, tiny, monkeypatch):
    import time as _time

    from modules.core.running import RunningBatch

    real, seen = RunningBatch.step, []

    def slow_step(self):
        _time.sleep(1.0)  # the engine is busy for longer than the deadline
        out = real(self)
        seen.extend(g.finish_reason for _, g in out)
        return out

    monkeypatch.setattr(RunningBatch, "step", slow_step)
    settings = Settings(store_dir=tmp_path, examples=False, request_timeout_s=0.3, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        r = c.post("/tasks/base/infer", json={"inputs": "hello", "parameters": {"max_new_tokens": 20}})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        deadline = _time.monotonic() + 10
        while not seen and _time.monotonic() < deadline:
            _time.sleep(0.05)
    assert seen == ["cancelled"]  # the row stopped at its first decode step


def test_a_corrupt_artifact_on_disk_marks_only_its_task_unavailable(tmp_path, tiny):
    from service.store import ModuleStore

    store = ModuleStore(tmp_path / "store")
    store.put("good", _artifact(tiny, LABELS), "prompt")
    bad = store.put("bad", _artifact(tiny, LABELS), "prompt")
    bad.path.write_bytes(bad.path.read_bytes()[:100])  # truncated on disk
    settings = Settings(store_dir=tmp_path / "store", examples=False, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        tasks = {t["name"]: t for t in c.get("/tasks").json()["tasks"]}
        assert tasks["bad"]["status"] == "unavailable" and tasks["bad"]["error"]
        assert tasks["good"]["status"] == "ready"
        r = c.post("/tasks/bad/infer", json={"inputs": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "task_unavailable"
        assert c.post("/tasks/good/infer", json={"inputs": "x"}).status_code == 200
        # a new upload replaces the broken version
        assert c.put("/tasks/bad", content=_artifact(tiny, LABELS)).status_code == 201
        assert c.post("/tasks/bad/infer", json={"inputs": "x"}).status_code == 200


def test_empty_env_values_mean_unset(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("FROZENLM_API_KEYS_FILE", "")
    monkeypatch.setenv("FROZENLM_PINNED", "")
    s = Settings()
    assert s.api_keys_file is None and s.pinned == []


def test_choices_answer_with_a_label_and_scores(app_client, tiny):
    """`parameters.choices` on a generation task (base) and on a classification task (its labels
    overridden); bad choices are 422 and nothing runs."""
    assert app_client.put("/tasks/cls", content=_artifact(tiny, LABELS), headers=ADMIN).status_code == 201
    for task in ("base", "cls"):
        r = app_client.post(f"/tasks/{task}/infer", json={"inputs": ["a", "bb"], "parameters": {"choices": [" x", " yz"]}})
        assert r.status_code == 200, r.text
        for out in r.json()["outputs"]:
            assert out["finish_reason"] == "label" and out["label"] in (" x", " yz")
            assert set(out["scores"]) == {" x", " yz"} and abs(sum(out["scores"].values()) - 1) < 1e-5
    for choices, code in (([" x"], "invalid_request"), ([" x", " x"], "invalid_request"),
                          ([f" c{i}" for i in range(33)], "invalid_request"), ([" x", ""], "invalid_request"),
                          ([" x", "word " * 20], "invalid_choices")):
        r = app_client.post("/tasks/base/infer", json={"inputs": "a", "parameters": {"choices": choices}})
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
