"""Loaded modules: an LRU cache on the device and a CPU tier behind it, keyed by (task, version).

A request resolves its task once and holds that module object until it finishes, so replacing
or evicting a version never changes what an in-flight request uses. Evicted modules drop to the
CPU tier as plain tensors (a warm load rebuilds them on the device without touching the disk);
past that tier's budget they are dropped and the next request loads them from the store (a cold
load). Pinned tasks are never evicted.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from modules import peft
from modules.core.artifact import ArtifactError, read_artifact
from modules.core.backbone import Backbone
from modules.core.module import MANIFEST_FILE, WEIGHTS_FILE, Manifest, TaskModule, parse_manifest
from modules.core.retrieval import DOCUMENTS_FILE, VECTORS_FILE
from modules.kinds.base import NoModule
from modules.registry import kind_class, load_module
from service.errors import Conflict, Invalid, NotFound, Unavailable, from_artifact_error
from service.schemas import NAME_PATTERN
from service.store import ModuleStore, StoredModule, valid_name

log = logging.getLogger("frozenlm.loaded")

BASE = "base"
_JSON_BYTES = 1 << 20
# Every file an artifact may hold (what load_module, load_peft and the documents reader read), with
# the most bytes it may unpack to (None: the artifact's budget; a safetensors file is also held to the
# size its header declares). PEFT's save_pretrained writes a README.md model card beside its adapter.
MEMBERS: dict[str, int | None] = {
    MANIFEST_FILE: _JSON_BYTES, WEIGHTS_FILE: None, DOCUMENTS_FILE: None, VECTORS_FILE: None,
    peft.CONFIG_FILE: _JSON_BYTES, peft.WEIGHTS_FILE: None, "README.md": _JSON_BYTES}
# An artifact unpacks to at most UNPACK_RATIO times its own size (float weights hardly compress; a
# bomb of zeros does), at least UNPACK_FLOOR, and never more than the loaded modules' max_artifact_bytes.
UNPACK_RATIO = 16
UNPACK_FLOOR = 16 << 20


@dataclass(frozen=True)
class Resolved:
    name: str
    version: int
    module: TaskModule


@dataclass(frozen=True)
class _Host:
    """A module parked on the CPU: its manifest and tensors."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class LoadedModules:
    def __init__(self, store: ModuleStore, backbone: Backbone, cache_bytes: int = 1 << 30,
                 max_artifact_bytes: int = 512 * 1024 * 1024, host_cache_bytes: int = 4 << 30,
                 pinned: frozenset[str] = frozenset()):
        self.store, self.backbone = store, backbone
        self.cache_bytes, self.host_cache_bytes = cache_bytes, host_cache_bytes
        self.max_artifact_bytes, self.pinned = max_artifact_bytes, pinned
        self._base = NoModule(backbone)
        self._loaded: OrderedDict[tuple[str, int], TaskModule] = OrderedDict()  # on the device
        self._host: OrderedDict[tuple[str, int], _Host] = OrderedDict()          # on the CPU
        self._broken: dict[tuple[str, int], str] = {}  # artifacts on disk that failed to load
        self._lock = threading.RLock()
        self.stats = {"hits": 0, "warm_loads": 0, "cold_loads": 0, "evictions": 0}

    # --- reading -----------------------------------------------------------------------------

    def unpack(self, data: bytes) -> dict[str, bytes]:
        """The files of an artifact: only the MEMBERS, each within its cap, all within the unpack
        budget (UNPACK_RATIO). Raises ArtifactError."""
        budget = min(self.max_artifact_bytes, max(UNPACK_FLOOR, UNPACK_RATIO * len(data)))
        return read_artifact(data, MEMBERS, max_bytes=budget)

    def check_all(self) -> None:
        """At start, without unpacking: each current artifact must have the sha256 recorded at upload
        and a valid manifest beside it (a version stored without one gets it written now, from its
        artifact); otherwise only its task is unavailable."""
        for name in self.store.names():
            stored = self.store.get(name)
            try:
                if not self.store.intact(stored):
                    raise ArtifactError(f"the artifact on disk does not have its recorded sha256 {stored.sha256}")
                if not stored.manifest_path.is_file():
                    self.store.write_manifest(stored, self.unpack(self.store.read(stored))[MANIFEST_FILE])
                parse_manifest(self.store.read_manifest(stored))
            except (ArtifactError, OSError, KeyError) as e:
                log.error("task %s v%d is unavailable: %s", name, stored.version, e)
                self._broken[(name, stored.version)] = str(e)

    def status(self, stored: StoredModule) -> tuple[str, str | None]:
        err = self._broken.get((stored.name, stored.version))
        return ("unavailable", err) if err else ("ready", None)

    def manifest(self, stored: StoredModule) -> dict | None:
        with self._lock:
            module = self._loaded.get((stored.name, stored.version))
        if module is not None:
            return module.manifest.model_dump()
        try:
            return parse_manifest(self.store.read_manifest(stored)).model_dump()
        except (ArtifactError, OSError):
            return None

    def resolve(self, name: str) -> Resolved:
        """The module serving `name` now, loaded on the device (blocking on a cold load)."""
        if name == BASE:
            return Resolved(BASE, 0, self._base)
        stored = self.store.get(name) if valid_name(name) else None
        if stored is None:
            raise NotFound(f"task {name!r} not found", code="task_not_found")
        key = (name, stored.version)
        with self._lock:
            if key in self._broken:
                raise Unavailable(f"task {name!r} v{stored.version} is unavailable: {self._broken[key]}",
                                  code="task_unavailable")
            module = self._loaded.get(key)
            if module is not None:
                self._loaded.move_to_end(key)
                self.stats["hits"] += 1
                return Resolved(name, stored.version, module)
            parked = self._host.pop(key, None)
        if parked is not None:  # warm: rebuild on the device from CPU tensors
            module = kind_class(parked.manifest.kind).from_tensors(parked.manifest, parked.tensors, self.backbone)
            self.stats["warm_loads"] += 1
        else:  # cold: from the store (outside the lock, so hits are never blocked by a load)
            try:
                data = self.store.read(stored)
            except FileNotFoundError:  # replaced or deleted between get() and read(): look again
                return self.resolve(name)
            try:
                module = load_module(self.unpack(data), self.backbone)
            except (ArtifactError, OSError) as e:
                self._broken[key] = str(e)
                raise Unavailable(f"task {name!r} v{stored.version} is unavailable: {e}",
                                  code="task_unavailable") from e
            self.stats["cold_loads"] += 1
        self._insert(key, module)
        return Resolved(name, stored.version, module)

    # --- writing -----------------------------------------------------------------------------

    def validate(self, data: bytes) -> tuple[TaskModule, bytes, bytes]:
        """Load an uploaded artifact without storing it: the module, the bytes to store (a PEFT
        adapter is stored as the native module it converts to) and their manifest. Raises a
        ServiceError if invalid."""
        try:
            files = self.unpack(data)
            module = load_module(files, self.backbone)
            if MANIFEST_FILE not in files:
                data = module.to_artifact()
                files = self.unpack(data)
        except ArtifactError as e:
            raise from_artifact_error(e) from e
        return module, data, files[MANIFEST_FILE]

    @staticmethod
    def check_name(name: str) -> None:
        """A name a module may be stored under (409 for 'base', 422 for one that is not valid)."""
        if name == BASE:
            raise Conflict("the task name 'base' is reserved for the backbone alone", code="reserved_name")
        if not valid_name(name):
            raise Invalid(f"invalid task name {name!r}: must match {NAME_PATTERN} in full",
                          code="invalid_name")

    def put(self, name: str, data: bytes) -> StoredModule:
        """Validate fully, then store atomically; a refused artifact leaves the store unchanged."""
        self.check_name(name)
        module, data, manifest = self.validate(data)
        stored = self.store.put(name, data, module.kind, manifest)
        with self._lock:
            self._insert((name, stored.version), module)
        return stored

    def delete(self, name: str) -> None:
        if name == BASE:
            raise Conflict("the task 'base' is the backbone itself and cannot be deleted", code="reserved_name")
        if not valid_name(name) or not self.store.delete(name):
            raise NotFound(f"task {name!r} not found", code="task_not_found")
        with self._lock:
            for key in [k for k in (*self._loaded, *self._host) if k[0] == name]:
                self._loaded.pop(key, None)
                self._host.pop(key, None)

    def _insert(self, key: tuple[str, int], module: TaskModule) -> None:
        with self._lock:
            for old in [k for k in (*self._loaded, *self._host) if k[0] == key[0] and k != key]:
                self._loaded.pop(old, None)  # superseded versions: in-flight requests keep their reference
                self._host.pop(old, None)
            self._loaded[key] = module
            self._loaded.move_to_end(key)
            for victim in self._victims(self._loaded, self.cache_bytes, lambda m: m.nbytes):
                evicted = self._loaded.pop(victim)
                self._host[victim] = _Host(evicted.manifest.model_copy(update={"config": evicted.artifact_config()}),
                                           evicted.tensors())
            for victim in self._victims(self._host, self.host_cache_bytes, lambda h: h.nbytes):
                del self._host[victim]
                self.stats["evictions"] += 1

    def _victims(self, tier: OrderedDict, budget: int, size) -> list[tuple[str, int]]:
        """Least recently used, unpinned entries to drop until the tier fits its budget (the newest stays)."""
        total = sum(size(v) for v in tier.values())
        out = []
        for k, v in list(tier.items())[:-1]:
            if total <= budget:
                break
            if k[0] not in self.pinned:
                out.append(k)
                total -= size(v)
        return out

    @property
    def loaded_bytes(self) -> int:
        return sum(m.nbytes for m in self._loaded.values())

    @property
    def loaded_count(self) -> int:
        return len(self._loaded)
