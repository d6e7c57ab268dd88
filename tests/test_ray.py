"""Scale-out on Ray Serve: a local two-replica cluster on the CPU, one store folder shared."""

from __future__ import annotations

import httpx
import pytest

from modules.registry import kind_class
from tests.server import free_port

ray = pytest.importorskip("ray", reason="the ray[serve] extra is not installed")


@pytest.fixture(scope="module")
def ray_app(tiny_served, tmp_path_factory):
    from ray import serve

    from service.ray_serve import deployment

    folder, bb = tiny_served
    store = tmp_path_factory.mktemp("shared-store")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(store), "FROZENLM_EXAMPLES": "false",
           "FROZENLM_THREADS": "1"}
    serve.run(deployment(env, num_replicas=2), route_prefix="/", name="frozenlm")
    yield f"http://127.0.0.1:{port}", bb
    serve.shutdown()
    ray.shutdown()


def test_two_replicas_serve_a_module_uploaded_once(ray_app):
    from clients import Client

    url, bb = ray_app
    art = kind_class("prompt").new(bb, {"num_virtual_tokens": 3}, labels={"yes": " y", "no": " n"}).to_artifact()
    up = httpx.put(f"{url}/tasks/shared", content=art, timeout=120)
    assert up.status_code == 201, up.text
    served_by: dict[str, set[str]] = {}
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(40):  # no multiplex header: Serve spreads these over both replicas
            r = c.post("/tasks/shared/infer", json={"inputs": "hello"})
            assert r.status_code == 200 and r.json()["outputs"][0]["label"] in ("yes", "no")
            served_by.setdefault("shared", set()).add(r.headers["x-frozenlm-replica"])
            if len(served_by["shared"]) == 2:
                break
    assert len(served_by["shared"]) == 2  # both replicas served the module uploaded once
    with Client(url) as client:  # the client sends serve_multiplexed_model_id: routed to a replica that has it
        labels = {client.infer("shared", "hi").outputs[0].label for _ in range(5)}
        assert labels <= {"yes", "no"}
        assert client.infer("base", "hi", max_new_tokens=2).task == "base"
