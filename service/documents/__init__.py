"""The documents feature: each task's documents (the passages retrieval searches), behind one
object, `Documents`, which the runtime builds and the routes call through `Runtime.documents`.

    body.py   what arrives: JSON-lines uploads and the documents an artifact carries, validated
    store.py  what is kept: each task's documents and indexes on disk (generations), and as loaded
    jobs.py   indexing in the background: dense vectors in bounded steps through the scheduler

Storing documents answers at once: they are written (all or nothing) with their BM25 index, and an
indexing job (done at once when nothing else is needed) computes their dense vectors when the task
needs them (its module retrieves by `dense` or `hybrid`) or a dense or hybrid search asks for them.
Until then the task answers from its last complete index.

Example::

    docs = Documents(module_store, backbone, lock, needs_dense=lambda task: True)
    docs.start()                                               # at start-up
    job = docs.add("faq", b'{"id": "q1", "text": "How do I ...?"}\\n')
    docs.wait("faq", job.id)                                    # the job, done
    docs.search("faq", "how", k=5, method="hybrid")            # [(Document, score), ...]
"""

from __future__ import annotations

import threading

from modules.core.retrieval import Document
from service.documents.body import Carried, from_artifact, parse_jsonl
from service.documents.jobs import Indexer, Indexing, IndexJob, Passes
from service.documents.store import DocumentStore, TaskDocuments
from service.errors import Unavailable
from service.store import ModuleStore

__all__ = ["Carried", "Documents", "IndexJob", "Indexing", "TaskDocuments"]


class Documents:
    """Every task's documents. Thread-safe.

    `scheduler`: backbone passes (embedding documents) are queued there like any request's row and
    run on the engine thread; without one they run on the indexer's thread under `lock`.
    `needs_dense(task)`: whether the task's module retrieves by dense vectors (then every change is
    embedded in the background). `step_tokens`: tokens embedded per backbone pass, at most."""

    def __init__(self, modules: ModuleStore, backbone, lock: threading.Lock | None = None, *, scheduler=None,
                 needs_dense=None, step_tokens: int = 512, batch_size: int = 16, max_tokens: int = 256):
        self.backbone, self.lock, self.max_tokens = backbone, lock, max_tokens
        self._store = DocumentStore(modules, backbone, batch_size=batch_size, max_tokens=max_tokens)
        self._passes = Passes(scheduler, lock)
        self._indexer = Indexer(self._store, self._passes, step_tokens=step_tokens)
        self._needs_dense = needs_dense or (lambda task: False)

    def start(self) -> None:
        """At start-up: remove what interrupted writes left, load every task's documents, queue the
        indexing that was interrupted or is needed, and start indexing."""
        for task in self._store.open_all():
            self._indexer.resume(task, self._store.state(task), self._wants_dense(task))
        self._indexer.start()

    def stop(self) -> None:
        """Stop indexing after the current step; an unfinished job resumes at the next start."""
        self._indexer.stop()

    def _wants_dense(self, task: str) -> bool:
        return self.backbone is not None and self._needs_dense(task)

    # --- writing -------------------------------------------------------------------------------

    def add(self, task: str, body: bytes) -> IndexJob:
        """Store the documents of a JSON-lines body (all or nothing, 422 naming the first bad line;
        an existing id is replaced in place, new ids are appended) with their BM25 index, and return
        the job that indexes them (done already when the task needs no dense vectors)."""
        docs = parse_jsonl(body)
        with self._store.task_lock(task):
            put = self._store.put(task, docs)
            return self._indexer.create(task, put.generation, self._wants_dense(task), put.added, put.replaced)

    def from_artifact(self, files: dict[str, bytes]) -> Carried | None:
        """The documents a module artifact carries (None if it carries none), checked: 422 before
        anything is stored."""
        return from_artifact(files, self.backbone.hidden_size)

    def replace(self, task: str, carried: Carried) -> IndexJob:
        """Make the documents an artifact carried the task's documents, all of them (with their
        vectors, when it carried them: nothing is embedded)."""
        with self._store.task_lock(task):
            put = self._store.replace(task, carried.docs, carried.vectors)
            return self._indexer.create(task, put.generation, self._wants_dense(task), put.added, put.replaced)

    def module_changed(self, task: str) -> None:
        """A new module version of the task: index dense vectors if it now needs them."""
        if not self._wants_dense(task):
            return
        with self._store.task_lock(task):
            latest = self._store.state(task).latest
            if latest is not None and not latest.dense and self._indexer.pending(task) is None:
                self._indexer.create(task, latest, dense=True)

    def clear(self, task: str) -> None:
        """Delete every document of the task, its indexes and its jobs."""
        with self._store.task_lock(task):
            self._store.clear(task)
            self._indexer.forget(task)

    def delete_task(self, task: str, delete):
        """Run `delete(task)` (which takes the task's folder, documents included) so that no
        document write runs into the folder being removed."""
        with self._store.task_lock(task):
            result = self._store.delete_task(task, delete)
            self._indexer.forget(task)
            return result

    # --- reading -------------------------------------------------------------------------------

    def list(self, task: str, offset: int = 0, limit: int = 100) -> tuple[int, list[Document]]:
        latest = self._store.state(task).latest
        docs = latest.docs if latest is not None else ()
        return len(docs), list(docs[offset:offset + limit])

    def get(self, task: str, doc_id: str) -> Document:
        from service.errors import NotFound

        latest = self._store.state(task).latest
        doc = latest.by_id.get(doc_id) if latest is not None else None
        if doc is None:
            raise NotFound(f"task {task!r} has no document {doc_id!r}", code="document_not_found")
        return doc

    def view(self, task: str, method: str) -> TaskDocuments:
        """The task's documents for a search by `method`, for a module's probe or a queued search on
        the engine thread: the newest generation for `bm25` (and when it has dense vectors), else the
        last complete dense index while a job computes the newest one's (a job is started if none
        is). Raises `Indexing` (503) while there is no dense index at all, empty documents aside."""
        state = self._store.state(task)
        latest = state.latest
        if method == "bm25" or latest is None or latest.dense:
            return TaskDocuments(latest)
        job = self._indexer.pending(task)
        if job is None:
            last = self._indexer.last(task, latest.uid)
            if last is not None and last.status == "failed" and state.dense is None:
                raise Unavailable(f"indexing the documents of task {task!r} failed ({last.error}); post them "
                                  f"again to retry", code="documents_index_failed")
            if last is None or last.status != "failed":
                with self._store.task_lock(task):
                    if self._indexer.pending(task) is None and self._store.state(task).latest is latest:
                        job = self._indexer.create(task, latest, dense=True)
        if state.dense is not None:
            return TaskDocuments(state.dense)
        raise Indexing(task, job or self._indexer.pending(task) or self._indexer.last(task, latest.uid))

    def search(self, task: str, query: str, k: int = 10, method: str = "hybrid") -> list[tuple[Document, float]]:
        """The best k documents for the query (a dense query pass runs like an indexing step)."""
        view = self.view(task, method)
        if method == "bm25":
            return view.search(query, k, method)
        return self._passes.run(lambda: view.search(query, k, method), self.max_tokens, task)

    # --- jobs ----------------------------------------------------------------------------------

    def job(self, task: str, job_id: str) -> IndexJob:
        self._store.require_task(task)
        return self._indexer.get(task, job_id)

    def jobs(self, task: str) -> list[IndexJob]:
        self._store.require_task(task)
        return self._indexer.list(task)

    def wait(self, task: str, job_id: str, timeout: float | None = None) -> IndexJob:
        """Block until the job (or the one that superseded it) ends; that job."""
        return self._indexer.wait(task, job_id, timeout)
