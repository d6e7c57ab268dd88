"""Property-based requests generated from the service's own OpenAPI: never a 500."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.config import Settings
from tests.conftest import tiny_backbone

# POST /tasks/{name}/documents takes JSON lines: generated bodies (strings) are sent as they are.
for _media in ("application/x-ndjson", "application/jsonl"):
    schemathesis.serializer.alias(_media, "text/plain")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cfg = Settings(store_dir=tmp_path_factory.mktemp("store"), examples=False, max_new_tokens=8,
                   max_input_tokens=128, _env_file=None)
    app = create_app(cfg, backbone=tiny_backbone())
    app.state.runtime.load()  # what the lifespan does, synchronously
    yield app
    app.state.runtime.stop()


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error])

        check()
