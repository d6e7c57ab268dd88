"""DocumentStore: each task's documents and their retrieval index, on disk beside the task's module.

    <store>/<task>/documents/current.json  {"generation": G, "count": N, "stamp"}: which generation serves
    <store>/<task>/documents/docs-G.jsonl  the documents, one {"id", "text", "title"?} a line, in order
    <store>/<task>/documents/index-G/      the Retriever built on them (modules/core/retrieval.py)

The documents file is the truth; the index is derived from it (a missing, corrupt or stale index is
rebuilt from the documents). A change writes a whole new generation: the documents file (temporary
file, fsync, rename), the index into a temporary folder (every file fsynced) renamed into place,
then `current.json` the same way, then the folder is fsynced and the old generation removed. A crash
at any moment leaves `current.json` naming a complete generation; leftovers are removed at start.
Living inside the task's folder, documents go with the task when `ModuleStore.delete` renames it away.

Every read checks `current.json` first (its `stamp`, a random id per write), so a generation written
by another process on the same store (another replica) is picked up. Writes to one task are
serialised by a lock, in this process only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from modules.core.retrieval import Document, Retriever
from service.documents.body import read_jsonl, to_jsonl
from service.errors import NotFound, Unavailable
from service.store import ModuleStore, fsync_dir, read_json, write_atomic

log = logging.getLogger("frozenlm.documents")

FOLDER = "documents"
CURRENT = "current.json"
TRASH_PREFIX = ".documents-trash-"
_DOCS_FILE = re.compile(r"^docs-(\d+)\.jsonl$")
_INDEX_DIR = re.compile(r"^index-(\d+)$")


@dataclass(frozen=True)
class _Snapshot:
    """One generation of a task's documents, as loaded. Never changed: a write swaps in a new one."""

    generation: int = 0
    stamp: str | None = None  # current.json's stamp; None: no documents on disk
    docs: tuple[Document, ...] = ()
    by_id: dict[str, Document] = field(default_factory=dict)
    retriever: Retriever | None = None
    error: str | None = None


@dataclass(frozen=True)
class TaskDocuments:
    """One generation of a task's documents, as a module reads them (`module.documents`, see
    TaskModule.reads_documents) and as a search queued by the endpoint does. Its searches run on the
    engine thread, which holds the backbone lock already: embedding a query (dense, hybrid) does not
    take it again."""

    snapshot: _Snapshot

    def search(self, query: str, k: int, method: str) -> list[tuple[Document, float]]:
        snap = self.snapshot
        if snap.retriever is None:
            return []
        return [(snap.by_id[i], s) for i, s in snap.retriever.search(query, k, method, lock_held=True)]

    def __len__(self) -> int:
        return len(self.snapshot.docs)


@dataclass(frozen=True)
class PutResult:
    added: int
    replaced: int
    count: int
    generation: int


class DocumentStore:
    """Documents and indexes of every task. Thread-safe. `lock` is held around each backbone pass
    made while embedding (shared with the engine, see Runtime.load).

        docs = DocumentStore(module_store, backbone, lock)
        docs.open_all()                                   # at start-up
        docs.put("faq", [Document("q1", "How do I ...?")])
        docs.search("faq", "how", k=5, method="bm25")     # [(Document, score), ...]
    """

    def __init__(self, modules: ModuleStore, backbone, lock: threading.Lock | None = None, *,
                 batch_size: int = 16, max_tokens: int = 256):
        self.modules, self.backbone, self.lock = modules, backbone, lock
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self._snapshots: dict[str, _Snapshot] = {}
        self._task_locks: dict[str, threading.RLock] = {}  # re-entrant: a write reads the snapshot too
        self._guard = threading.Lock()

    def _retriever(self) -> Retriever:
        return Retriever(self.backbone, batch_size=self.batch_size, max_tokens=self.max_tokens, lock=self.lock)

    def _task_lock(self, task: str) -> threading.RLock:
        with self._guard:
            return self._task_locks.setdefault(task, threading.RLock())

    def _folder(self, task: str) -> Path:
        return self.modules.root / task / FOLDER

    # --- start-up ------------------------------------------------------------------------------

    def open_all(self) -> None:
        """Remove what interrupted writes left, then load every task's documents and index
        (re-embedding a dense index made on another backbone, and saving it)."""
        for task_dir in sorted(p for p in self.modules.root.iterdir() if p.is_dir()):
            for p in task_dir.glob(f"{TRASH_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
            folder = task_dir / FOLDER
            if not folder.is_dir():
                continue
            if self.modules.get(task_dir.name) is None:  # documents of a task that is gone
                shutil.rmtree(folder, ignore_errors=True)
                continue
            cur = self._read_current(folder)
            if cur is not None or not (folder / CURRENT).exists():  # an unreadable pointer: touch nothing
                self._clean(folder, cur)
            with self._task_lock(task_dir.name):
                snap = self._load(task_dir.name, repair=True)
            if snap.docs:
                log.info("task %s: %d documents (generation %d)", task_dir.name, len(snap.docs), snap.generation)

    @staticmethod
    def _read_current(folder: Path) -> dict | None:
        return read_json(folder / CURRENT)

    @staticmethod
    def _clean(folder: Path, cur: dict | None) -> None:
        """Keep only current.json and the current generation's files."""
        keep = {CURRENT}
        if cur is not None:
            keep |= {f"docs-{cur['generation']}.jsonl", f"index-{cur['generation']}"}
        for p in folder.iterdir():
            if p.name in keep:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _load(self, task: str, repair: bool = False) -> _Snapshot:
        """Read the task's current generation from disk and make it the snapshot (task lock held).
        `repair` (at start-up only, never on a request's path): an index that is unreadable, stale or
        made on another backbone is rebuilt from the documents and saved; otherwise such a snapshot
        is unavailable until then."""
        folder = self._folder(task)
        cur = self._read_current(folder) if folder.is_dir() else None
        if cur is None and (folder / CURRENT).exists():
            log.error("documents of task %s are unavailable: %s is unreadable", task, folder / CURRENT)
            snap = _Snapshot(error=f"{CURRENT} is unreadable")
        elif cur is None:
            snap = _Snapshot()
        else:
            g, stamp = int(cur["generation"]), cur.get("stamp")
            try:
                docs = read_jsonl(folder / f"docs-{g}.jsonl")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("documents of task %s are unavailable: %s", task, e)
                snap = _Snapshot(generation=g, stamp=stamp, error=f"{type(e).__name__}: {e}")
            else:
                try:
                    retriever = Retriever.load(folder / f"index-{g}", self.backbone, docs, rebuild=repair,
                                               batch_size=self.batch_size, lock=self.lock)
                    if not repair and self.backbone is not None and retriever.index is None:
                        raise ValueError("its dense index was made on another backbone")
                except Exception as e:  # noqa: BLE001 - the index is derived: rebuild it from the documents
                    if not repair:
                        log.error("index of task %s unreadable (%s): it is rebuilt at the next start", task, e)
                        retriever = None
                    else:
                        log.warning("index of task %s unreadable (%s): rebuilding it", task, e)
                        retriever = self._retriever().build(docs)
                        retriever.rebuilt = True
                if retriever is None:
                    snap = _Snapshot(generation=g, stamp=stamp, error=f"the index of generation {g} is unreadable")
                else:
                    if retriever.rebuilt:  # saved, so the next start does not rebuild it again
                        g, stamp = self._commit(task, docs, retriever)
                    snap = _Snapshot(g, stamp, docs, {d.id: d for d in docs}, retriever)
        with self._guard:
            self._snapshots[task] = snap
        return snap

    # --- reading -------------------------------------------------------------------------------

    def _require_task(self, task: str) -> None:
        if self.modules.get(task) is None:
            raise NotFound(f"task {task!r} not found", code="task_not_found")

    def _current(self, task: str) -> _Snapshot:
        """The task's snapshot, reloaded if another process wrote a newer generation."""
        self._require_task(task)
        cur = self._read_current(self._folder(task))
        on_disk = cur.get("stamp") if cur else None
        with self._guard:
            snap = self._snapshots.get(task)
        if snap is None or snap.stamp != on_disk:
            with self._task_lock(task):
                with self._guard:
                    snap = self._snapshots.get(task)
                if snap is None or snap.stamp != on_disk:
                    snap = self._load(task)
        if snap.error:
            raise Unavailable(f"documents of task {task!r} could not be read: {snap.error}",
                              code="documents_unavailable")
        return snap

    def list(self, task: str, offset: int = 0, limit: int = 100) -> tuple[int, list[Document]]:
        docs = self._current(task).docs
        return len(docs), list(docs[offset:offset + limit])

    def get(self, task: str, doc_id: str) -> Document:
        doc = self._current(task).by_id.get(doc_id)
        if doc is None:
            raise NotFound(f"task {task!r} has no document {doc_id!r}", code="document_not_found")
        return doc

    def view(self, task: str) -> TaskDocuments:
        """The task's current documents, for a module or a queued search to search from the engine thread."""
        return TaskDocuments(self._current(task))

    def search(self, task: str, query: str, k: int = 10, method: str = "hybrid") -> list[tuple[Document, float]]:
        """The best k documents for the query (see Retriever.search). Dense passes hold `lock`."""
        snap = self._current(task)
        if snap.retriever is None:
            return []
        return [(snap.by_id[i], s) for i, s in snap.retriever.search(query, k, method)]

    # --- writing -------------------------------------------------------------------------------

    def put(self, task: str, docs: list[Document]) -> PutResult:
        """Add documents (ids unique within `docs`); an existing id is replaced in place, new ids are
        appended in order. The index is rebuilt, reusing the vectors of unchanged documents."""
        with self._task_lock(task):
            old = self._current(task)
            merged = dict(old.by_id)
            replaced = sum(d.id in merged for d in docs)
            order = [d.id for d in old.docs] + [d.id for d in docs if d.id not in merged]
            merged.update((d.id, d) for d in docs)
            new = tuple(merged[i] for i in order)
            retriever = self._retriever().build(new, reuse=old.retriever)
            g, stamp = self._commit(task, new, retriever)
            with self._guard:
                self._snapshots[task] = _Snapshot(g, stamp, new, {d.id: d for d in new}, retriever)
            return PutResult(added=len(docs) - replaced, replaced=replaced, count=len(new), generation=g)

    def replace(self, task: str, docs: list[Document], vectors=None) -> PutResult:
        """Make `docs` the task's documents, all of them, in this order (an artifact that carries
        documents). `vectors` (N, d): their dense vectors, made by the same retriever settings on
        this backbone (see modules.core.retrieval.documents_files): nothing is embedded. Without them,
        unchanged documents keep their vectors and the rest are embedded."""
        with self._task_lock(task):
            old = self._current(task)
            docs = tuple(docs)
            retriever = self._retriever().build(docs, reuse=old.retriever, vectors=vectors)
            g, stamp = self._commit(task, docs, retriever)
            with self._guard:
                self._snapshots[task] = _Snapshot(g, stamp, docs, {d.id: d for d in docs}, retriever)
            kept = len({d.id for d in docs} & set(old.by_id))
            return PutResult(added=len(docs) - kept, replaced=kept, count=len(docs), generation=g)

    def clear(self, task: str) -> None:
        """Delete every document of the task and its index (atomically: the folder is renamed away)."""
        with self._task_lock(task):
            self._require_task(task)
            self._remove_folder(task)
            with self._guard:
                self._snapshots[task] = _Snapshot()

    def delete_task(self, task: str, delete):
        """Run `delete(task)` (the task's own delete, which takes its folder and so its documents)
        with the task's lock held, so no document write runs into a folder being deleted."""
        with self._task_lock(task):
            result = delete(task)
            with self._guard:
                self._snapshots.pop(task, None)
            return result

    def _remove_folder(self, task: str) -> None:
        folder = self._folder(task)
        if not folder.exists():
            return
        trash = folder.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
        os.replace(folder, trash)
        fsync_dir(folder.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def _commit(self, task: str, docs, retriever: Retriever) -> tuple[int, str]:
        """Write docs + index as a new generation and make it current; returns (generation, stamp)."""
        folder = self._folder(task)
        if not folder.is_dir():
            folder.mkdir()
            fsync_dir(folder.parent)
        cur = self._read_current(folder)
        used = [int(m.group(1)) for p in folder.iterdir()
                if (m := _DOCS_FILE.match(p.name) or _INDEX_DIR.match(p.name))]
        g = max(used + [int(cur["generation"]) if cur else 0]) + 1
        write_atomic(folder / f"docs-{g}.jsonl", to_jsonl(docs))
        tmp = folder / f".index-{g}-{uuid.uuid4().hex}"
        try:
            retriever.save(tmp)
            fsync_dir(tmp)
            os.replace(tmp, folder / f"index-{g}")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            (folder / f"docs-{g}.jsonl").unlink(missing_ok=True)
            raise
        stamp = uuid.uuid4().hex
        write_atomic(folder / CURRENT, json.dumps({"generation": g, "count": len(docs), "stamp": stamp}).encode())
        fsync_dir(folder)
        self._clean(folder, {"generation": g})
        return g, stamp
