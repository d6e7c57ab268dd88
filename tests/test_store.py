"""ModuleStore: versions, atomic replace and delete, clean-up after an interrupted write."""

from __future__ import annotations

import json

from service.store import ModuleStore, valid_name


def test_versions_increase_and_only_the_current_file_stays(tmp_path):
    store = ModuleStore(tmp_path)
    a = store.put("sst2", b"one", "prompt")
    b = store.put("sst2", b"two", "prompt")
    assert (a.version, b.version) == (1, 2)
    assert store.read(store.get("sst2")) == b"two"
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == ["current.json", "v2.module"]
    assert store.get("sst2").sha256 == b.sha256 != a.sha256
    assert store.names() == ["sst2"]


def test_delete_removes_everything_and_names_can_be_reused(tmp_path):
    store = ModuleStore(tmp_path)
    store.put("t", b"x", "prompt")
    assert store.delete("t") and not store.delete("t")
    assert store.get("t") is None and store.names() == [] and list(tmp_path.iterdir()) == []
    assert store.put("t", b"y", "prompt").version == 1


def test_an_interrupted_put_leaves_the_old_version_serving(tmp_path):
    store = ModuleStore(tmp_path)
    store.put("t", b"old", "prompt")
    folder = tmp_path / "t"
    # what a crash leaves at each point of a put: a temp file, and a complete but never-current version
    (folder / ".v2.module.abc.tmp").write_bytes(b"ne")
    (folder / "v2.module").write_bytes(b"new")
    (folder / ".current.json.def.tmp").write_text("{")
    (tmp_path / ".trash-u-123").mkdir()
    store = ModuleStore(tmp_path)  # restart
    assert store.read(store.get("t")) == b"old" and store.get("t").version == 1
    assert sorted(p.name for p in folder.iterdir()) == ["current.json", "v1.module"]
    assert not (tmp_path / ".trash-u-123").exists()
    assert store.put("t", b"newer", "prompt").version == 2


def test_each_version_keeps_its_manifest_beside_its_artifact(tmp_path):
    store = ModuleStore(tmp_path)
    store.put("t", b"one", "prompt", b'{"v": 1}')
    two = store.put("t", b"two", "prompt", b'{"v": 2}')
    assert store.read_manifest(store.get("t")) == b'{"v": 2}' and two.manifest_path.name == "v2.manifest.json"
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["current.json", "v2.manifest.json", "v2.module"]
    (tmp_path / "t" / "v3.manifest.json").write_text("{}")  # a put interrupted before current.json
    (tmp_path / "t" / ".v3.manifest.json.abc.tmp").write_text("{")
    store = ModuleStore(tmp_path)  # restart
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["current.json", "v2.manifest.json", "v2.module"]


def test_a_version_stored_without_a_manifest_gets_one(tmp_path):
    store = ModuleStore(tmp_path)
    stored = store.put("t", b"old", "prompt")
    assert not stored.manifest_path.exists()
    store.write_manifest(stored, b"{}")
    assert store.read_manifest(store.get("t")) == b"{}"


def test_intact_compares_the_artifact_with_its_recorded_sha256(tmp_path):
    store = ModuleStore(tmp_path)
    stored = store.put("t", b"abc", "prompt")
    assert store.intact(stored)
    stored.path.write_bytes(b"abd")
    assert not store.intact(stored)


def test_current_json_records_what_serves(tmp_path):
    store = ModuleStore(tmp_path)
    s = store.put("t", b"abc", "prompt")
    meta = json.loads((tmp_path / "t" / "current.json").read_text())
    assert meta == {"version": 1, "kind": "prompt", "sha256": s.sha256, "size_bytes": 3}


def test_names():
    for ok in ["a", "sst2", "my-task_1.v2", "0" * 64]:
        assert valid_name(ok), ok
    for bad in ["", "A", "-x", ".x", "a/b", "..", "a b", "0" * 65, "é", "base\n", "sst2\n", "a\r\n"]:
        assert not valid_name(bad), bad


def test_names_never_become_paths_outside_the_store(tmp_path):
    store = ModuleStore(tmp_path / "store")
    (tmp_path / "current.json").write_text('{"version": 1}')  # a file the store must never read
    for bad in ["..", ".", "../x", "a/b", ""]:
        assert store.get(bad) is None and not store.delete(bad)
    try:
        store.put("..", b"x", "prompt")
    except ValueError as e:
        assert "invalid task name" in str(e)
    else:
        raise AssertionError("put accepted '..'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json", "store"]


def test_at_start_the_loaded_modules_check_sha256_and_writes_missing_manifests_without_loading(tmp_path, tiny):
    from modules.core.artifact import read_artifact
    from modules.registry import kind_class
    from service.loaded import LoadedModules

    blob = kind_class("prompt").new(tiny, {"num_virtual_tokens": 2}, template="{input}").to_artifact()
    store = ModuleStore(tmp_path)
    old = store.put("old", blob, "prompt")  # stored before manifests were kept beside artifacts
    bad = store.put("bad", blob, "prompt", read_artifact(blob)["module.json"])
    bad.path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    loaded = LoadedModules(store, tiny)
    loaded.check_all()
    assert store.read_manifest(old) == read_artifact(blob)["module.json"]
    assert loaded.status(old) == ("ready", None) and loaded.loaded_count == 0
    status, error = loaded.status(bad)
    assert status == "unavailable" and "sha256" in error
    assert loaded.manifest(bad)["kind"] == "prompt"
