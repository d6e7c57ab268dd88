"""The async client in-process (httpx.ASGITransport), its error family, and the import direction."""

from __future__ import annotations

import httpx
import pytest

from clients import AsyncClient, Conflict, FrozenLMError, InvalidRequest, NotFound, Unauthorized
from modules.registry import kind_class
from service.app import create_app
from service.config import Settings


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny):
    cfg = Settings(store_dir=tmp_path_factory.mktemp("store"), examples=False, admin_key="k", _env_file=None)
    app = create_app(cfg, backbone=tiny)
    app.state.runtime.load()  # what the lifespan does (ASGITransport does not run it)
    yield app
    app.state.runtime.stop()


@pytest.mark.anyio
async def test_async_client_round_trip_and_errors(app, tiny):
    art = kind_class("prompt").new(tiny, {"num_virtual_tokens": 2}, labels={"a": " a", "b": " b"}).to_artifact()
    transport = httpx.ASGITransport(app=app)
    async with AsyncClient("http://test", api_key="k", transport=transport) as c:
        assert await c.ready()
        up = await c.upload("cls", art)
        assert (up.name, up.version, up.kind) == ("cls", 1, "prompt")
        tasks = await c.list_tasks()
        assert [t.name for t in tasks] == ["cls"] and tasks[0].status == "ready"
        res = await c.infer("cls", ["x", "y"])
        assert res.task == "cls" and [o.label in ("a", "b") for o in res.outputs] == [True, True]
        assert abs(sum(res.outputs[0].scores.values()) - 1) < 1e-5
        gen = await c.infer("base", "hi", max_new_tokens=3)
        assert gen.outputs[0].label is None and gen.usage["completion_tokens"] <= 3
        with pytest.raises(NotFound) as e:
            await c.infer("missing", "x")
        assert (e.value.status, e.value.code) == (404, "task_not_found") and isinstance(e.value, FrozenLMError)
        with pytest.raises(InvalidRequest):
            await c.infer("base", "x", temperature=-1)
        with pytest.raises(Conflict):
            await c.upload("base", art)
        await c.delete("cls")
        assert await c.list_tasks() == []
    async with AsyncClient("http://test", transport=httpx.ASGITransport(app=app)) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.upload("cls", art)


def test_429_and_503_are_retried_honouring_retry_after(monkeypatch):
    from clients import Client, Overloaded

    answers = [httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"code": "queue_full", "message": "m"}}),
               httpx.Response(503, json={"error": {"code": "not_ready", "message": "m"}}),
               httpx.Response(200, json={"status": "ok", "tasks": []})]
    calls, slept = [], []

    def handler(request):
        calls.append(request.url.path)
        return answers[len(calls) - 1]

    monkeypatch.setattr("clients.client.time.sleep", slept.append)
    with Client("http://test", transport=httpx.MockTransport(handler), backoff=0.25) as c:
        assert c.list_tasks() == []
    assert len(calls) == 3 and slept == [2.0, 0.5]  # Retry-After, then backoff 0.25 * 2**1
    calls.clear()
    answers[:] = [httpx.Response(429, json={"error": {"code": "queue_full", "message": "m"}})] * 5
    with Client("http://test", transport=httpx.MockTransport(handler), retries=2) as c, pytest.raises(Overloaded):
        c.list_tasks()
    assert len(calls) == 3  # the first try and two retries


def test_cli_talks_to_a_server(tiny_served, tmp_path, capsys):
    from clients.cli import main as cli

    folder, bb = tiny_served
    art = tmp_path / "m.zip"
    art.write_bytes(kind_class("prompt").new(bb, {"num_virtual_tokens": 2}, labels={"a": " a", "b": " b"}).to_artifact())
    from tests.server import running_server

    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path / "s"), "FROZENLM_EXAMPLES": "false"}
    with running_server(env) as url:
        assert cli(["--url", url, "upload", "cls", str(art)]) == 0
        assert "uploaded cls v1 (prompt" in capsys.readouterr().out
        assert cli(["--url", url, "tasks"]) == 0 and "cls" in capsys.readouterr().out
        assert cli(["--url", url, "infer", "cls", "hello"]) == 0
        assert capsys.readouterr().out.split("\t")[0] in ("a", "b")
        assert cli(["--url", url, "infer", "base", "hello", "--choice", " yes", "--choice", " no"]) == 0
        label, scores = capsys.readouterr().out.split("\t")
        assert label in (" yes", " no") and " yes=" in scores and " no=" in scores
        assert cli(["--url", url, "backbone"]) == 0 and bb.info.fingerprint in capsys.readouterr().out
        assert cli(["--url", url, "health"]) == 0 and capsys.readouterr().out.strip() == "ready"
        assert cli(["--url", url, "metrics"]) == 0 and "frozenlm_requests_total" in capsys.readouterr().out
        assert cli(["--url", url, "infer", "nope", "x"]) == 1
        assert "404 task_not_found" in capsys.readouterr().err
        assert cli(["--url", url, "delete", "cls"]) == 0


def test_public_names_of_the_client():
    import clients

    assert sorted(clients.__all__) == ["AsyncClient", "Client", "Conflict", "DocumentsJob", "FrozenLMError", "InferResult",
                                       "InvalidRequest", "NotFound", "Output", "Overloaded", "TaskInfo",
                                       "Unauthorized", "Uploaded"]
    for name in clients.__all__:
        assert getattr(clients, name).__module__ == "clients.client"
    for cls in (clients.NotFound, clients.InvalidRequest, clients.Conflict, clients.Overloaded, clients.Unauthorized):
        assert issubclass(cls, clients.FrozenLMError)
    for method in ("ready", "backbone", "metrics", "list_tasks", "get_task", "upload", "delete", "infer"):
        assert callable(getattr(clients.Client, method)) and callable(getattr(clients.AsyncClient, method))


def test_upload_with_progress_sends_the_same_bytes(capsys):
    from clients import Client

    got = {}

    def handler(request):
        got["body"] = request.read()
        return httpx.Response(201, json={"name": "t", "version": 1, "kind": "prompt", "sha256": "x",
                                         "size_bytes": len(got["body"])})

    data = bytes(range(256)) * 1000
    with Client("http://test", transport=httpx.MockTransport(handler)) as c:
        assert c.upload("t", data, progress=True).size_bytes == len(data)
    assert got["body"] == data
    assert "upload" in capsys.readouterr().err
