"""Indexing jobs: a generation's dense vectors, computed in the background in bounded steps.

Storing documents never waits for the backbone: the store writes them and their BM25 index at once,
and a job (`IndexJob`) computes their dense vectors when the task needs them (its module retrieves
by `dense` or `hybrid`, or a dense or hybrid search asked). One thread (`Indexer`) runs the jobs of
every task, one at a time, as a series of steps: each step embeds a few documents (at most
`step_tokens` tokens, at least one document) in one backbone pass, queued in the scheduler like any
request's row (`Passes`), so the engine runs it between its own steps and other tasks' inference
never waits for more than one step. Vectors already known are never recomputed: those of the
documents' previous dense index, and those an interrupted job saved (`partial.safetensors`, written
every `checkpoint_docs` documents and whenever a job stops early). When every document has its
vector, the store gives the generation its dense index and the job is done.

Statuses: queued -> running -> done | failed; `superseded` when newer documents arrived first (the
newer generation's job takes over, reusing what this one computed: see `superseded_by`). A job's
record is kept in `jobs/<id>.json` (written when it is created and when it ends). After a restart,
an unfinished job of the current generation is queued again under the same id; it resumes from
what was saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
import time
import uuid
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field

import numpy as np

from modules.core.retrieval import CHARS_PER_TOKEN_CAP
from service.documents.store import JOBS, PARTIAL, DocumentStore, Generation, State
from service.errors import NotFound, Overloaded, Unavailable
from service.store import read_json, write_atomic

log = logging.getLogger("frozenlm.documents")

FINAL = ("done", "failed", "superseded")
KEEP_JOBS = 20  # finished job records kept per task


class Indexing(Unavailable):
    """The task's documents have no index for this method yet: a job is computing it."""

    code = "documents_indexing"

    def __init__(self, task: str, job: "IndexJob | None"):
        where = (f" (job {job.id}: {job.done} of {job.total} documents embedded); see "
                 f"GET /tasks/{task}/documents/jobs/{job.id}") if job is not None else ""
        super().__init__(f"documents of task {task!r} are being indexed{where}", headers={"Retry-After": "2"})
        self.job = job


@dataclass
class IndexJob:
    """One indexing job, as GET /tasks/{name}/documents/jobs/{id} shows it."""

    id: str
    task: str
    generation: int
    uid: str = field(repr=False)  # the generation's uid (numbers start again after a clear)
    dense: bool                   # whether it computes dense vectors (else BM25 was all, done at once)
    count: int                    # documents of the generation
    added: int = 0
    replaced: int = 0
    status: str = "queued"
    done: int = 0                 # documents embedded (resumed ones included)
    total: int = 0                # documents this job embeds (those without a known vector); set when it starts
    resumed: int = 0              # of `done`, recovered from an interrupted job's saved vectors
    error: str | None = None
    superseded_by: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINAL

    def record(self) -> dict:
        return asdict(self)

    def out(self) -> dict:
        d = asdict(self)
        d.pop("uid")
        return d


class Stopping(Exception):
    """The server is shutting down: the job stops and resumes at the next start."""


class Passes:
    """Runs one backbone pass for a job: queued in the scheduler (in its task's line, as a request's rows are,
    run on the engine thread with the backbone lock held), or, without a scheduler, here under
    `lock`. Blocks until it ran; retries while the queue is full. A pass is queued when no request
    waits in the queue (or after `yield_s` seconds of waiting), so a request that arrives during
    indexing waits for the step that runs, not for the next one too."""

    def __init__(self, scheduler=None, lock: threading.Lock | None = None, yield_s: float = 1.0):
        self.scheduler, self.lock, self.yield_s = scheduler, lock, yield_s

    def run(self, work, cost: int, task: str = "", stopping=lambda: False):
        """`work()`'s result. `stopping()` turning true while the pass still waits in the queue
        takes it out and raises Stopping."""
        if self.scheduler is None:
            import torch

            with self.lock if self.lock is not None else contextlib.nullcontext(), torch.inference_mode():
                return work()
        from service.scheduler import Job

        waited = time.monotonic() + self.yield_s
        while self.scheduler.depth and time.monotonic() < waited and not stopping():
            time.sleep(0.005)
        wait = 0.1
        while True:
            job = Job(None, [], None, max(1, cost), task=task, work=work)
            try:
                self.scheduler.submit([job])
            except Overloaded:
                time.sleep(wait)
                wait = min(2.0, wait * 2)
                continue
            except Unavailable as e:  # closed: shutting down
                raise Stopping(str(e)) from None
            while True:
                try:
                    return job.future.result(timeout=1.0)
                except FutureTimeout:
                    if stopping() and job.future.cancel():
                        raise Stopping("stopped while queued") from None


class Indexer:
    """The jobs of every task, run one at a time on a thread of their own. Thread-safe."""

    def __init__(self, store: DocumentStore, passes: Passes, *, step_tokens: int = 512, checkpoint_docs: int = 64):
        self.store, self.passes = store, passes
        self.step_tokens, self.checkpoint_docs = max(1, step_tokens), checkpoint_docs
        self._jobs: dict[str, IndexJob] = {}
        self._queue: deque[str] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="frozenlm-indexer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step (the job is saved and resumes at the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def resume(self, task: str, state: State, needs_dense: bool) -> None:
        """At start: queue again the task's unfinished job of its current generation (same id);
        close the others; start one if the task needs dense vectors that nothing computes."""
        latest = state.latest
        pending = None
        for record in self._records(task):
            if record.finished:
                continue
            if latest is not None and record.uid == latest.uid and not latest.dense and pending is None:
                record.status, pending = "queued", record
                log.info("task %s: indexing job %s resumes", task, record.id)
            else:
                record.status = "done" if latest is not None and record.uid == latest.uid else "superseded"
                record.finished_at = time.time()
                self._save(record)
        if pending is not None:
            with self._cond:
                self._jobs[pending.id] = pending
                self._queue.append(pending.id)
                self._cond.notify_all()
        elif latest is not None and needs_dense and not latest.dense:
            self.create(task, latest, dense=True)

    # --- jobs ----------------------------------------------------------------------------------

    def create(self, task: str, generation: Generation, dense: bool, added: int = 0, replaced: int = 0) -> IndexJob:
        """A job for the task's new latest generation (call with the task's lock held). Without
        `dense` it is done at once (BM25 was built with the documents). Unfinished jobs of the task
        are superseded by it; when one of them computes dense vectors, so does this one (the work a
        dense search or retrieval waits for continues here, where `superseded_by` leads)."""
        with self._cond:
            older = [j for j in self._jobs.values() if j.task == task and not j.finished]
        dense = dense or any(j.dense for j in older)
        job = IndexJob(uuid.uuid4().hex[:16], task, generation.number, generation.uid, dense, len(generation.docs),
                       added, replaced)
        if not dense or generation.dense:
            job.status, job.finished_at = "done", time.time()
        with self._cond:
            older = [j for j in self._jobs.values() if j.task == task and not j.finished]
            for old in older:
                old.status, old.superseded_by, old.finished_at = "superseded", job.id, time.time()
            self._jobs[job.id] = job
        for j in (*older, job):  # never under _cond: saving takes the task's lock (lock order: task, then _cond)
            self._save(j)
        with self._cond:
            if not job.finished:
                self._queue.append(job.id)
            self._cond.notify_all()
        return job

    def get(self, task: str, job_id: str) -> IndexJob:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None or job.task != task:
            job = next((r for r in self._records(task) if r.id == job_id), None)
        if job is None:
            raise NotFound(f"task {task!r} has no indexing job {job_id!r}", code="job_not_found")
        return job

    def list(self, task: str) -> list[IndexJob]:
        """The task's jobs, newest first (those in memory, then the records on disk)."""
        with self._cond:
            live = {j.id: j for j in self._jobs.values() if j.task == task}
        jobs = {**{r.id: r for r in self._records(task)}, **live}
        return sorted(jobs.values(), key=lambda j: -j.created_at)

    def pending(self, task: str) -> IndexJob | None:
        with self._cond:
            return next((j for j in self._jobs.values() if j.task == task and not j.finished), None)

    def last(self, task: str, uid: str) -> IndexJob | None:
        """The newest job of this generation (in memory)."""
        with self._cond:
            mine = [j for j in self._jobs.values() if j.task == task and j.uid == uid]
        return max(mine, key=lambda j: j.created_at, default=None)

    def forget(self, task: str) -> None:
        """The task's documents are gone: its jobs stop at their next step and are forgotten."""
        with self._cond:
            for job in [j for j in self._jobs.values() if j.task == task]:
                if not job.finished:
                    job.status, job.finished_at = "superseded", time.time()
                del self._jobs[job.id]

    def wait(self, task: str, job_id: str, timeout: float | None = None) -> IndexJob:
        """Block until the job ends, following `superseded_by`; the last job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(task, job_id)
        with self._cond:
            while not job.finished or job.superseded_by:
                if job.finished:
                    job = self._jobs.get(job.superseded_by) or self.get(task, job.superseded_by)
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job.id} did not finish within {timeout}s")
                self._cond.wait(left if left is not None else 1.0)
        return job

    # --- running -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.get(self._queue.popleft())
            if job is None or job.finished:
                continue
            try:
                self._run(job)
            except Stopping:
                with self._cond:
                    job.status = "queued"  # its record says queued: it resumes at the next start
                return
            except Exception as e:  # noqa: BLE001 - the job fails, the indexer goes on
                log.exception("indexing job %s of task %s failed", job.id, job.task)
                self._end(job, "failed", f"{type(e).__name__}: {e}")

    def _run(self, job: IndexJob) -> None:
        try:
            state = self.store.state(job.task)
        except (NotFound, Unavailable) as e:
            self._end(job, "failed", e.message)
            return
        latest = state.latest
        if latest is None or latest.uid != job.uid:
            self._end(job, "superseded")
            return
        if latest.dense:
            self._end(job, "done")
            return
        retriever = self.store.retriever()
        known: dict[str, np.ndarray] = {}
        if state.dense is not None and retriever.reusable(state.dense.retriever):
            known.update(state.dense.retriever.by_digest())
        wanted = {d.digest: d for d in latest.docs if d.digest not in known}
        saved = {h: v for h, v in self._load_partial(job.task, retriever).items() if h in wanted}
        known.update(saved)
        todo = [d for h, d in wanted.items() if h not in saved]
        with self._cond:
            job.status, job.total, job.done, job.resumed = "running", len(wanted), len(saved), len(saved)
        log.info("task %s: indexing job %s embeds %d documents (%d known, %d resumed)", job.task, job.id,
                 len(todo), len(latest.docs) - len(wanted), len(saved))
        fresh: dict[str, np.ndarray] = {}
        steps, lengths = self._steps(retriever, todo)
        for step in steps:
            if job.finished or self._stopping:  # superseded, forgotten, or shutting down
                self._save_partial(job.task, retriever, {**saved, **fresh})
                if self._stopping:
                    raise Stopping
                return
            passages = [d.passage for d in step]
            cost = sum(lengths[d.digest] for d in step)
            try:
                vecs = self.passes.run(lambda p=passages: retriever.embed(p, lock_held=True), cost, job.task,
                                       stopping=lambda: self._stopping)
            except Exception:
                self._save_partial(job.task, retriever, {**saved, **fresh})
                raise
            fresh.update((d.digest, v) for d, v in zip(step, vecs))
            with self._cond:
                job.done += len(step)
            if len(fresh) % self.checkpoint_docs < len(step) and len(fresh) >= self.checkpoint_docs:
                self._save_partial(job.task, retriever, {**saved, **fresh})
        known.update(fresh)
        vectors = np.stack([known[d.digest] for d in latest.docs]) if latest.docs else None
        if vectors is None or self.store.commit_dense(job.task, job.uid, vectors) is None:
            self._save_partial(job.task, retriever, {**saved, **fresh})
            self._end(job, "superseded")
        else:
            self._end(job, "done")

    def _steps(self, retriever, docs) -> tuple[list[list], dict[str, int]]:
        """Documents in steps of at most `step_tokens` tokens (at least one document, at most the
        retriever's batch size), longest first so a step pads little; and each one's tokens."""
        tok = retriever.backbone.tokenizer
        cut = [d.passage[: retriever.max_tokens * CHARS_PER_TOKEN_CAP] for d in docs]
        ids = tok(cut, add_special_tokens=False)["input_ids"] if cut else []
        lengths = {d.digest: max(1, min(len(i), retriever.max_tokens)) for d, i in zip(docs, ids)}
        ordered = sorted(docs, key=lambda d: -lengths[d.digest])
        steps, step, used = [], [], 0
        for d in ordered:
            n = lengths[d.digest]
            if step and (used + n > self.step_tokens or len(step) >= retriever.batch_size):
                steps.append(step)
                step, used = [], 0
            step.append(d)
            used += n
        return steps + ([step] if step else []), lengths

    def _end(self, job: IndexJob, status: str, error: str | None = None) -> None:
        with self._cond:
            ended = not job.finished
            if ended:
                job.status, job.error, job.finished_at = status, error, time.time()
            self._cond.notify_all()
        if not ended:  # superseded or forgotten meanwhile: that stands
            return
        self._save(job)
        if status == "done":
            log.info("task %s: indexing job %s done (%d documents embedded)", job.task, job.id, job.done)

    # --- on disk -------------------------------------------------------------------------------

    def _save(self, job: IndexJob) -> None:
        """Write the job's record (only while the task's documents folder exists), keep the newest."""
        folder = self.store.folder(job.task)
        with self.store.task_lock(job.task):
            if not folder.is_dir():
                return
            (folder / JOBS).mkdir(exist_ok=True)
            write_atomic(folder / JOBS / f"{job.id}.json", json.dumps(job.record()).encode())
            records = sorted((folder / JOBS).glob("*.json"), key=lambda p: p.stat().st_mtime)
            for p in records[:-KEEP_JOBS]:
                p.unlink(missing_ok=True)

    def _records(self, task: str) -> list[IndexJob]:
        folder = self.store.folder(task) / JOBS
        out = []
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            d = read_json(p)
            if d is None:  # removed meanwhile (only the newest are kept), or unreadable
                continue
            try:
                out.append(IndexJob(**d))
            except TypeError:
                log.warning("unreadable job record %s", p)
        return out

    @staticmethod
    def _meta(retriever) -> dict:
        m = retriever.manifest()
        return {"fingerprint": retriever.backbone.info.fingerprint, "max_tokens": retriever.max_tokens,
                "projection": (m.get("dense") or {}).get("projection")}

    def _save_partial(self, task: str, retriever, vectors: dict[str, np.ndarray]) -> None:
        """Vectors computed so far (by digest), for the job that takes over or resumes."""
        if not vectors:
            return
        from safetensors.numpy import save

        digests = sorted(vectors)
        data = save({"vectors": np.stack([vectors[h] for h in digests]).astype(np.float32)},
                    metadata={"digests": json.dumps(digests), **{k: json.dumps(v) for k, v in self._meta(retriever).items()}})
        folder = self.store.folder(task)
        with self.store.task_lock(task):
            if folder.is_dir():
                write_atomic(folder / PARTIAL, data)

    def _load_partial(self, task: str, retriever) -> dict[str, np.ndarray]:
        path = self.store.folder(task) / PARTIAL
        try:
            data = path.read_bytes()
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8:8 + n]).get("__metadata__", {})
            if any(json.loads(meta.get(k, "null")) != v for k, v in self._meta(retriever).items()):
                return {}
            from safetensors.numpy import load

            vectors = load(data)["vectors"]
            digests = json.loads(meta["digests"])
            if vectors.shape != (len(digests), retriever.dim):
                return {}
        except (OSError, ValueError, KeyError, struct.error):
            return {}
        return dict(zip(digests, vectors))
