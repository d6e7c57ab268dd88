"""DocumentStore: each task's documents and their retrieval indexes, on disk beside the task's module.

    <store>/<task>/documents/current.json       which files serve (below)
    <store>/<task>/documents/docs-G.jsonl       generation G's documents, one {"id", "text", "title"?} a line
    <store>/<task>/documents/index-G-<hex>/     a Retriever built on them (modules/core/retrieval.py): BM25,
                                                and their dense vectors once an indexing job computed them
    <store>/<task>/documents/jobs/<id>.json     indexing jobs (jobs.py)
    <store>/<task>/documents/partial.safetensors  vectors an unfinished job computed so far (jobs.py)

`current.json` names two generations:

    {"stamp": "<random id per write>",
     "latest": {"generation": G, "uid", "count", "docs": "docs-G.jsonl", "index": "index-G-<hex>"},
     "dense":  the newest generation whose index has dense vectors: "latest" itself, an older one
               while a job computes the latest's vectors, or null}

`latest` holds the task's documents (listed, got, and searched by BM25 at once); `dense` is the last
complete index for dense and hybrid searches, so a task answers from it while a new one builds.

The documents file is the truth; an index is derived from it. Every write makes new files (a
temporary file or folder, fsynced, renamed into place), then replaces `current.json` the same way,
fsyncs the folder and removes what `current.json` no longer names. A crash at any moment leaves
`current.json` naming complete files; leftovers are removed at start. Living inside the task's
folder, documents go with the task when `ModuleStore.delete` renames it away.

Reading never builds or writes anything: every read checks `current.json`'s stamp first, so a
generation written by another process on the same store (another replica) is picked up, and an
index that cannot be read makes the task's documents unavailable (503) until `open_all`, at the next
start, rebuilds its BM25 part. Writes to one task are serialised by a lock, in this process only.
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

import numpy as np

from modules.core.retrieval import Document, Retriever
from service.documents.body import read_jsonl, to_jsonl
from service.errors import NotFound, Unavailable
from service.store import ModuleStore, fsync_dir, read_json, write_atomic

log = logging.getLogger("frozenlm.documents")

FOLDER = "documents"
CURRENT = "current.json"
JOBS = "jobs"
PARTIAL = "partial.safetensors"
TRASH_PREFIX = ".documents-trash-"
_NUMBERED = re.compile(r"^(?:docs|index)-(\d+)")


@dataclass(frozen=True)
class Generation:
    """One generation of a task's documents and its index, as loaded. Never changed."""

    number: int
    uid: str                         # tells generations apart across a clear (numbers start again)
    docs: tuple[Document, ...]
    retriever: Retriever             # BM25 always; `retriever.index` once dense vectors are computed
    files: dict                      # its entry in current.json
    by_id: dict[str, Document] = field(default_factory=dict)

    @property
    def dense(self) -> bool:
        return self.retriever.index is not None


@dataclass(frozen=True)
class State:
    """A task's documents as `current.json` names them, loaded. Replaced whole by every write."""

    stamp: str | None = None         # current.json's stamp; None: no documents on disk
    latest: Generation | None = None
    dense: Generation | None = None
    error: str | None = None


@dataclass(frozen=True)
class TaskDocuments:
    """One generation of a task's documents, as a module's probe reads them (its request's
    Context.documents) and as a queued search does. Its searches run on the engine thread, which
    holds the backbone lock already: embedding a query (dense, hybrid) does not take it again."""

    generation: Generation | None

    def search(self, query: str, k: int, method: str) -> list[tuple[Document, float]]:
        g = self.generation
        if g is None:
            return []
        return [(g.by_id[i], s) for i, s in g.retriever.search(query, k, method, lock_held=True)]

    def __len__(self) -> int:
        return 0 if self.generation is None else len(self.generation.docs)


@dataclass(frozen=True)
class PutResult:
    added: int
    replaced: int
    count: int
    generation: Generation


class DocumentStore:
    """Documents and indexes of every task, on disk and loaded. Thread-safe. Builds BM25 indexes
    (no backbone pass); dense vectors come from outside (`commit_dense`, see jobs.py)."""

    def __init__(self, modules: ModuleStore, backbone, *, batch_size: int = 16, max_tokens: int = 256):
        self.modules, self.backbone = modules, backbone
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self._states: dict[str, State] = {}
        self._task_locks: dict[str, threading.RLock] = {}  # re-entrant: a write reads the state too
        self._guard = threading.Lock()

    def retriever(self) -> Retriever:
        """A retriever with this store's settings (dense vectors are embedded by `retriever().embed`)."""
        return Retriever(self.backbone, batch_size=self.batch_size, max_tokens=self.max_tokens, progress=False)

    def task_lock(self, task: str) -> threading.RLock:
        """Held around every write to the task's documents."""
        with self._guard:
            return self._task_locks.setdefault(task, threading.RLock())

    def folder(self, task: str) -> Path:
        return self.modules.root / task / FOLDER

    # --- start-up ------------------------------------------------------------------------------

    def open_all(self) -> list[str]:
        """Remove what interrupted writes left, load every task's documents (rebuilding the BM25
        part of an index that cannot be read, from the documents) and return the tasks that have
        documents."""
        tasks = []
        for task_dir in sorted(p for p in self.modules.root.iterdir() if p.is_dir()):
            for p in task_dir.glob(f"{TRASH_PREFIX}*"):
                shutil.rmtree(p, ignore_errors=True)
            folder = task_dir / FOLDER
            if not folder.is_dir():
                continue
            if self.modules.get(task_dir.name) is None:  # documents of a task that is gone
                shutil.rmtree(folder, ignore_errors=True)
                continue
            pointer = _read_pointer(folder)
            if pointer is not None or not (folder / CURRENT).exists():  # an unreadable pointer: touch nothing
                _clean(folder, pointer)
            with self.task_lock(task_dir.name):
                state = self._load(task_dir.name, repair=True)
            if state.latest is not None:
                tasks.append(task_dir.name)
                log.info("task %s: %d documents (generation %d%s)", task_dir.name, len(state.latest.docs),
                         state.latest.number, "" if state.latest.dense else ", no dense vectors yet")
        return tasks

    def _load(self, task: str, repair: bool = False) -> State:
        """Read what the task's current.json names and make it the task's state (task lock held).
        `repair` (at start-up only, never on a request's path): a latest index that cannot be read is
        rebuilt from the documents (BM25 only) and saved, and a dense generation that cannot be read
        is dropped (a job computes the vectors again); otherwise such a state is unavailable."""
        folder = self.folder(task)
        pointer = _read_pointer(folder) if folder.is_dir() else None
        if pointer is None and (folder / CURRENT).exists():
            log.error("documents of task %s are unavailable: %s is unreadable", task, folder / CURRENT)
            state = State(error=f"{CURRENT} is unreadable")
        elif pointer is None:
            state = State()
        else:
            state = self._load_pointer(task, folder, pointer, repair)
        with self._guard:
            self._states[task] = state
        return state

    def _load_pointer(self, task: str, folder: Path, pointer: dict, repair: bool) -> State:
        stamp = pointer.get("stamp")
        try:
            latest = self._generation(folder, pointer["latest"], dense=False)
        except Exception as e:  # noqa: BLE001 - the index is derived from the documents
            if not repair:
                log.error("documents of task %s are unavailable: %s", task, e)
                return State(stamp=stamp, error=f"the index is unreadable ({type(e).__name__}: {e}); it is "
                                                f"rebuilt at the next start")
            try:
                docs = read_jsonl(folder / pointer["latest"]["docs"])
            except (OSError, ValueError, KeyError, TypeError) as e2:
                log.error("documents of task %s are unavailable: %s", task, e2)
                return State(stamp=stamp, error=f"{type(e2).__name__}: {e2}")
            log.warning("index of task %s unreadable (%s): rebuilding its BM25 part", task, e)
            latest = None
        dense = None
        if pointer.get("dense") is not None:
            if latest is not None and pointer["dense"].get("uid") == latest.uid and latest.dense:
                dense = latest
            else:
                try:
                    dense = self._generation(folder, pointer["dense"], dense=True)
                except Exception as e:  # noqa: BLE001 - vectors are derived: a job computes them again
                    if not repair:
                        return State(stamp=stamp, error=f"the dense index is unreadable ({type(e).__name__}: "
                                                        f"{e}); it is rebuilt at the next start")
                    log.warning("dense index of task %s unreadable (%s): its vectors are computed again", task, e)
        if latest is None:  # repair: BM25 from the documents, saved
            return self._commit(task, docs, self.retriever().build(docs, dense=False), dense)
        if repair and dense is None and pointer.get("dense") is not None:
            return self._point(task, latest, None)
        return State(stamp, latest, dense)

    def _generation(self, folder: Path, entry: dict, dense: bool) -> Generation:
        """A generation from its current.json entry; raises when its files cannot be read (or, with
        `dense`, have no dense vectors made on this backbone). Never builds anything."""
        docs = read_jsonl(folder / entry["docs"])
        retriever = Retriever.load(folder / entry["index"], self.backbone, docs, rebuild=False,
                                   batch_size=self.batch_size, progress=False)
        if dense and retriever.index is None:
            raise ValueError(f"{entry['index']} has no dense vectors made on this backbone")
        return Generation(int(entry["generation"]), str(entry.get("uid", "")), docs, retriever, dict(entry),
                          {d.id: d for d in docs})

    # --- reading -------------------------------------------------------------------------------

    def require_task(self, task: str) -> None:
        if self.modules.get(task) is None:
            raise NotFound(f"task {task!r} not found", code="task_not_found")

    def state(self, task: str) -> State:
        """The task's state, reloaded (read-only) if another process wrote since; 404 for an unknown
        task, 503 while its documents cannot be read."""
        self.require_task(task)
        pointer = _read_pointer(self.folder(task))
        on_disk = pointer.get("stamp") if pointer else None
        with self._guard:
            state = self._states.get(task)
        if state is None or state.stamp != on_disk:
            with self.task_lock(task):
                with self._guard:
                    state = self._states.get(task)
                if state is None or state.stamp != on_disk:
                    state = self._load(task)
        if state.error:
            raise Unavailable(f"documents of task {task!r} could not be read: {state.error}",
                              code="documents_unavailable")
        return state

    # --- writing (task lock held by the caller for a read-modify-write) ---------------------------

    def put(self, task: str, docs: list[Document]) -> PutResult:
        """Add documents (ids unique within `docs`): an existing id is replaced in place, new ids are
        appended in order. Writes a new latest generation with its BM25 index; its dense vectors
        are reused from the dense generation when every document has one there (else a job computes
        them)."""
        with self.task_lock(task):
            old = self.state(task)
            merged = dict(old.latest.by_id) if old.latest else {}
            replaced = sum(d.id in merged for d in docs)
            order = ([d.id for d in old.latest.docs] if old.latest else []) + [d.id for d in docs if d.id not in merged]
            merged.update((d.id, d) for d in docs)
            new = tuple(merged[i] for i in order)
            state = self._commit(task, new, self._bm25_with_known_vectors(new, old.dense), old.dense)
            return PutResult(len(docs) - replaced, replaced, len(new), state.latest)

    def replace(self, task: str, docs: list[Document], vectors: np.ndarray | None = None) -> PutResult:
        """Make `docs` the task's documents, all of them, in this order (an artifact that carries
        documents). `vectors` (N, d): their dense vectors, made by the same retriever settings on
        this backbone: the new generation is complete at once."""
        with self.task_lock(task):
            old = self.state(task)
            docs = tuple(docs)
            if vectors is not None:
                retriever = self.retriever().build(docs, vectors=vectors)
            else:
                retriever = self._bm25_with_known_vectors(docs, old.dense)
            state = self._commit(task, docs, retriever, old.dense)
            kept = len({d.id for d in docs} & set(old.latest.by_id if old.latest else ()))
            return PutResult(len(docs) - kept, kept, len(docs), state.latest)

    def _bm25_with_known_vectors(self, docs, dense: Generation | None) -> Retriever:
        retriever = self.retriever().build(docs, dense=False)
        known = dense.retriever.by_digest() if dense is not None and retriever.reusable(dense.retriever) else {}
        if self.backbone is not None and docs and all(d.digest in known for d in docs):
            return retriever.with_vectors(np.stack([known[d.digest] for d in docs]))
        return retriever

    def commit_dense(self, task: str, uid: str, vectors: np.ndarray) -> Generation | None:
        """Give the latest generation (if it is still `uid`) its dense vectors (N, d), in document
        order: it becomes the task's dense generation too. None when the generation was replaced."""
        with self.task_lock(task):
            try:
                state = self.state(task)
            except (NotFound, Unavailable):
                return None
            if state.latest is None or state.latest.uid != uid:
                return None
            folder = self.folder(task)
            retriever = state.latest.retriever.with_vectors(vectors)
            index = self._write_index(folder, state.latest.number, retriever)
            entry = {**state.latest.files, "index": index}
            g = Generation(state.latest.number, uid, state.latest.docs, retriever, entry, state.latest.by_id)
            self._point(task, g, g)
            (folder / PARTIAL).unlink(missing_ok=True)
            return g

    def clear(self, task: str) -> None:
        """Delete every document of the task, its indexes and jobs (atomically: the folder is renamed away)."""
        with self.task_lock(task):
            self.require_task(task)
            folder = self.folder(task)
            if folder.exists():
                trash = folder.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                os.replace(folder, trash)
                fsync_dir(folder.parent)
                shutil.rmtree(trash, ignore_errors=True)
            with self._guard:
                self._states[task] = State()

    def delete_task(self, task: str, delete):
        """Run `delete(task)` (the task's own delete, which takes its folder and so its documents)
        with the task's lock held, so no document write runs into a folder being deleted."""
        with self.task_lock(task):
            result = delete(task)
            with self._guard:
                self._states.pop(task, None)
            return result

    def _commit(self, task: str, docs, retriever: Retriever, dense: Generation | None) -> State:
        """Write docs + index as a new latest generation (dense too when its index has vectors)."""
        folder = self.folder(task)
        if not folder.is_dir():
            folder.mkdir()
            fsync_dir(folder.parent)
        pointer = _read_pointer(folder)
        used = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
        n = max(used + [int(pointer["latest"]["generation"]) if pointer else 0]) + 1
        write_atomic(folder / f"docs-{n}.jsonl", to_jsonl(docs))
        try:
            index = self._write_index(folder, n, retriever)
        except BaseException:
            (folder / f"docs-{n}.jsonl").unlink(missing_ok=True)
            raise
        entry = {"generation": n, "uid": uuid.uuid4().hex, "count": len(docs), "docs": f"docs-{n}.jsonl", "index": index}
        g = Generation(n, entry["uid"], tuple(docs), retriever, entry, {d.id: d for d in docs})
        return self._point(task, g, g if g.dense else dense)

    @staticmethod
    def _write_index(folder: Path, n: int, retriever: Retriever) -> str:
        """Save the retriever into a new folder (every file fsynced, then renamed into place); its name."""
        name = f"index-{n}-{uuid.uuid4().hex[:12]}"
        tmp = folder / f".{name}.tmp"
        try:
            retriever.save(tmp)
            fsync_dir(tmp)
            os.replace(tmp, folder / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def _point(self, task: str, latest: Generation, dense: Generation | None) -> State:
        """Make current.json name these generations, then remove what it no longer names."""
        folder = self.folder(task)
        stamp = uuid.uuid4().hex
        pointer = {"stamp": stamp, "latest": latest.files, "dense": dense.files if dense is not None else None}
        write_atomic(folder / CURRENT, json.dumps(pointer).encode())
        fsync_dir(folder)
        _clean(folder, pointer)
        state = State(stamp, latest, dense)
        with self._guard:
            self._states[task] = state
        return state


def _read_pointer(folder: Path) -> dict | None:
    """current.json, in the present form; one written before dense generations were kept
    ({"generation", "count", "stamp"}) reads as a latest generation whose index may have vectors."""
    cur = read_json(folder / CURRENT)
    if cur is None:
        return None
    if "latest" in cur:
        return cur if isinstance(cur["latest"], dict) else None
    try:
        g = int(cur["generation"])
    except (KeyError, TypeError, ValueError):
        return None
    entry = {"generation": g, "uid": f"v1-{cur.get('stamp')}", "count": cur.get("count"),
             "docs": f"docs-{g}.jsonl", "index": f"index-{g}"}
    return {"stamp": cur.get("stamp"), "latest": entry, "dense": entry}


def _clean(folder: Path, pointer: dict | None) -> None:
    """Keep only current.json, the jobs, the partial vectors and the files current.json names."""
    keep = {CURRENT, JOBS, PARTIAL}
    for entry in (pointer or {}).get("latest"), (pointer or {}).get("dense"):
        if entry:
            keep |= {entry.get("docs"), entry.get("index")}
    for p in folder.iterdir():
        if p.name in keep:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
