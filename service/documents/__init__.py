"""The documents feature: each task's documents (the passages retrieval searches), behind one
object, `Documents`, which the runtime builds and the routes call through it.

    body.py   what arrives: JSON-lines uploads and the documents an artifact carries, validated
    store.py  what is kept: each task's documents and retrieval index on disk, and the loaded snapshot

Example::

    docs = Documents(module_store, backbone, lock)
    docs.open_all()                                          # at start-up
    docs.add("faq", b'{"id": "q1", "text": "How do I ...?"}\\n')
    docs.search("faq", "how", k=5, method="bm25")            # [(Document, score), ...]
"""

from __future__ import annotations

import threading

from modules.core.retrieval import Document
from service.documents.body import Carried, from_artifact, parse_jsonl
from service.documents.store import DocumentStore, PutResult, TaskDocuments
from service.store import ModuleStore

__all__ = ["Carried", "Documents", "PutResult", "TaskDocuments"]


class Documents:
    """Every task's documents. Thread-safe. `lock` is held around each backbone pass made while
    embedding (shared with the engine, see Runtime.load)."""

    def __init__(self, modules: ModuleStore, backbone, lock: threading.Lock | None = None, *,
                 batch_size: int = 16, max_tokens: int = 256):
        self.backbone, self.lock, self.max_tokens = backbone, lock, max_tokens
        self._store = DocumentStore(modules, backbone, lock, batch_size=batch_size, max_tokens=max_tokens)

    def open_all(self) -> None:
        """At start-up: remove what interrupted writes left, load every task's documents and index."""
        self._store.open_all()

    # --- writing -------------------------------------------------------------------------------

    def add(self, task: str, body: bytes) -> PutResult:
        """Add the documents of a JSON-lines body (all or nothing, 422 naming the first bad line);
        an existing id is replaced in place, new ids are appended."""
        return self._store.put(task, parse_jsonl(body))

    def from_artifact(self, files: dict[str, bytes]) -> Carried | None:
        """The documents a module artifact carries (None if it carries none), checked: 422 before
        anything is stored."""
        return from_artifact(files, self.backbone.hidden_size)

    def replace(self, task: str, carried: Carried) -> PutResult:
        """Make the documents an artifact carried the task's documents, all of them."""
        return self._store.replace(task, carried.docs, carried.vectors)

    def clear(self, task: str) -> None:
        self._store.clear(task)

    def delete_task(self, task: str, delete):
        """Run `delete(task)` (which takes the task's folder, documents included) so that no
        document write runs into the folder being removed."""
        return self._store.delete_task(task, delete)

    # --- reading -------------------------------------------------------------------------------

    def list(self, task: str, offset: int = 0, limit: int = 100) -> tuple[int, list[Document]]:
        return self._store.list(task, offset, limit)

    def get(self, task: str, doc_id: str) -> Document:
        return self._store.get(task, doc_id)

    def view(self, task: str) -> TaskDocuments:
        """The task's current documents, for a module's probe or a queued search on the engine thread."""
        return self._store.view(task)

    def search(self, task: str, query: str, k: int = 10, method: str = "hybrid") -> list[tuple[Document, float]]:
        """The best k documents for the query; a dense pass holds `lock`."""
        return self._store.search(task, query, k, method)
