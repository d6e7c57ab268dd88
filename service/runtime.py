"""The service object the routes call: backbone, store, loaded modules, scheduler and engine together.

Route handlers call one method here each; nothing torch-related runs on the event loop (module
loads and tokenization go to the thread pool, forward passes to the engine thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import torch
from starlette.concurrency import run_in_threadpool

from modules.core.artifact import ArtifactError
from modules.core.backbone import Backbone
from modules.core.constraint import Constraint, ConstraintError, grammars_for
from modules.core.decode import Sampling
from modules.core.module import MAX_LABEL_TOKENS
from modules.core.stages import Context
from modules.registry import kind_class
from service import metrics
from service.config import Settings
from service.continuous import ContinuousEngine
from service.documents import Documents, Indexing
from service.engine import Engine, Scored, label_cost
from service.errors import (
    ClientGone,
    Conflict,
    Invalid,
    NotFound,
    ServiceError,
    Timeout,
    TooLarge,
    Unavailable,
    from_artifact_error,
)
from service.loaded import LoadedModules
from service.scheduler import Job, Scheduler
from service.schemas import InferParameters, InferResponse, Output, TaskOut, TokenLogprob, TopLogprob, Uploaded, Usage
from service.security import KeyRing
from service.store import ModuleStore

log = logging.getLogger("frozenlm.runtime")


class Piece(NamedTuple):
    """A streamed piece of sample `index`'s text, with the logprobs of the tokens whose text ends
    in it (None unless the request asked for logprobs)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None


def logprobs_out(tokens) -> list[TokenLogprob]:
    """modules.core.decode.TokenLogprob entries as the API's."""
    def top(t) -> TopLogprob:
        return TopLogprob(token=t.text, id=t.id, logprob=t.logprob, bytes=list(t.bytes))

    return [TokenLogprob(**top(t).model_dump(), top_logprobs=[top(a) for a in t.top]) for t in tokens]


def _samples(result) -> list:
    """A job's result as a list of its samples' (one unless the job had n > 1)."""
    return result if isinstance(result, list) else [result]


class Runtime:
    def __init__(self, settings: Settings, backbone=None):
        self.settings = settings
        self.keys = KeyRing(settings.admin_key, settings.api_keys_file)
        self.scheduler = Scheduler(settings.max_queue, settings.max_batch_size, settings.max_batch_tokens)
        self.backbone = backbone  # injected (tests) or loaded in load()
        self.loaded = None
        self.engine = None
        self._documents = None  # service.documents.Documents, once loaded (see `documents`)
        # The engine holds this lock for each batch (and for the passes queued as jobs of their own:
        # document searches and indexing steps), and so does any backbone pass outside it:
        # Backbone.forward keeps the running pass's per-row deltas on the shared backbone, so two
        # passes must never overlap.
        self.backbone_lock = threading.Lock()
        self.error: str | None = None
        self._ready = threading.Event()

    # --- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the backbone, open the store, install examples, start the engine (blocking)."""
        s = self.settings
        try:
            if s.threads:
                torch.set_num_threads(s.threads)
            t = time.monotonic()
            if self.backbone is None:
                self.backbone = Backbone.load(s.backbone or None, device=s.device, dtype=s.dtype,
                                              cache_dir=s.cache_dir)
            log.info("backbone %s loaded on %s/%s in %.1fs (fingerprint %s)", self.backbone.name,
                     self.backbone.device, self.backbone.dtype, time.monotonic() - t, self.backbone.info.fingerprint)
            store = ModuleStore(s.store_dir)
            self.loaded = LoadedModules(store, self.backbone, s.cache_bytes, max_artifact_bytes=8 * s.max_upload_bytes,
                                     host_cache_bytes=s.host_cache_bytes, pinned=frozenset(s.pinned))
            self._documents = Documents(store, self.backbone, self.backbone_lock, scheduler=self.scheduler,
                                        needs_dense=self._needs_dense, step_tokens=s.prefill_tokens)
            if s.examples and not store.names():
                self._install_examples(s.examples_dir)
            self.loaded.check_all()
            self._documents.start()
            hooks = {"on_batch": metrics.observe_batch, "on_cancel": metrics.CANCELLED.inc, "lock": self.backbone_lock}
            if s.engine == "static":
                self.engine = Engine(self.backbone, self.scheduler, **hooks)
            else:
                self.engine = ContinuousEngine(self.backbone, self.scheduler, max_running=s.max_batch_size,
                                               kv_tokens=s.kv_tokens, prefill_tokens=s.prefill_tokens,
                                               prefix_cache_tokens=s.prefix_cache_tokens,
                                               on_step=metrics.observe_step, **hooks)
            self.engine.start()
            self._ready.set()
            log.info("ready: %d tasks in %s", len(store.names()), s.store_dir)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("start-up failed")
            raise

    def _install_examples(self, folder: Path) -> None:
        for path in sorted(Path(folder).glob("*.zip")):
            try:
                self._put(path.stem, path.read_bytes())
                log.info("installed example task %s", path.stem)
            except ServiceError as e:
                log.warning("example task %s not installed: %s", path.stem, e.message)

    def stop(self) -> None:
        if self._documents is not None:
            self._documents.stop()  # after its current step; an unfinished job resumes at the next start
        if self.engine is not None:
            self.engine.stop()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _require_ready(self) -> None:
        if not self.ready:
            raise Unavailable(self.error or "backbone is still loading", code="not_ready",
                              headers={"Retry-After": "5"})

    @property
    def documents(self):
        """The documents feature (service.documents.Documents) the routes call; 503 until ready."""
        self._require_ready()
        return self._documents

    # --- tasks -------------------------------------------------------------------------------

    def _task_out(self, stored, with_manifest: bool) -> TaskOut:
        status, err = self.loaded.status(stored)
        return TaskOut(name=stored.name, version=stored.version, kind=stored.kind, status=status,
                       size_bytes=stored.size_bytes, sha256=stored.sha256, error=err,
                       manifest=self.loaded.manifest(stored) if with_manifest else None)

    def list_tasks(self) -> list[TaskOut]:
        self._require_ready()
        store = self.loaded.store
        return [self._task_out(st, True) for n in store.names() if (st := store.get(n)) is not None]

    def get_task(self, name: str) -> TaskOut:

        self._require_ready()
        stored = self.loaded.store.get(name) if name != "base" else None
        if stored is None:
            raise NotFound(f"task {name!r} not found", code="task_not_found")
        return self._task_out(stored, True)

    def _artifact_documents(self, data: bytes):
        """The documents an artifact carries (service.documents.Carried), or None; checked before
        anything is stored, so a bad documents file refuses the whole upload."""
        try:
            files = self.loaded.unpack(data)
        except ArtifactError as e:
            raise from_artifact_error(e) from e
        return self._documents.from_artifact(files)

    def _put(self, name: str, data: bytes):
        """Store a module; an artifact carrying documents makes them the task's documents."""
        self.loaded.check_name(name)
        documents = self._artifact_documents(data)
        stored = self.loaded.put(name, data)
        if documents is not None:
            self._documents.replace(name, documents)
        else:
            self._documents.module_changed(name)
        return stored

    def _needs_dense(self, task: str) -> bool:
        """Whether the task's module searches its documents by dense vectors (read from its
        manifest: nothing is loaded)."""
        stored = self.loaded.store.get(task)
        manifest = self.loaded.manifest(stored) if stored is not None else None
        try:
            return kind_class(manifest["kind"]).retrieval_of(manifest["config"]) in ("dense", "hybrid")
        except Exception:  # noqa: BLE001 - no manifest, an unknown kind: it reads no documents
            return False

    def _resolve(self, name: str):
        """The module serving `name` (runs in the thread pool)."""
        return self.loaded.resolve(name)

    async def _context(self, resolved):
        """What a request brings to its module besides its ids (modules.core.stages.Context): its
        task's documents when its kind reads them (409 while the task has none). Given with each
        row, never set on the module, which every request shares."""
        module = resolved.module
        if not module.reads_documents:
            return Context()
        view = await self._documents_view(resolved.name, module.retrieval_of(module.manifest.config))
        if not len(view):
            raise Conflict(f"task {resolved.name!r} ({module.kind}) answers from its documents and has none: upload "
                           f"them with POST /tasks/{resolved.name}/documents (JSON lines)", code="no_documents")
        return Context(documents=view)  # its probe searches them on the engine thread

    async def _documents_view(self, name: str, method: str):
        """The task's documents for a search by `method` (service.documents.Documents.view), waiting,
        up to the request deadline, while the first index with dense vectors builds (then 503)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            try:
                return await run_in_threadpool(self._documents.view, name, method)
            except Indexing:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)

    async def put_task(self, name: str, data: bytes) -> Uploaded:
        self._require_ready()
        stored = await run_in_threadpool(self._put, name, data)
        return Uploaded(name=stored.name, version=stored.version, kind=stored.kind, sha256=stored.sha256,
                        size_bytes=stored.size_bytes)

    async def delete_task(self, name: str) -> None:
        self._require_ready()
        # under the task's documents lock: no document write runs into the folder being removed
        await run_in_threadpool(self._documents.delete_task, name, self.loaded.delete)

    # --- inference ---------------------------------------------------------------------------

    def _jobs(self, task: str, module, inputs: list, p: InferParameters, on_text=None) -> list[Job]:
        """Tokenize and check limits (runs in the thread pool)."""
        s, gen = self.settings, module.manifest.generation
        if p.max_new_tokens is not None and p.max_new_tokens > s.max_new_tokens:
            raise Invalid(f"max_new_tokens {p.max_new_tokens} is above the limit {s.max_new_tokens}",
                          code="limit_exceeded")
        max_new = p.max_new_tokens or min(gen.max_new_tokens, s.max_new_tokens)
        labels = self._choices(module, p.choices) if p.choices else None
        n = p.n or 1
        if labels or module.manifest.labels:
            scored = "the request's choices" if labels else f"task {task!r}'s labels"
            for name, asked in (("n", n > 1), ("logprobs", p.logprobs is not None),
                                ("json_schema", p.json_schema is not None), ("regex", p.regex is not None)):
                if asked:
                    raise Invalid(f"{name}: this request is answered by scoring {scored} (see `scores`); "
                                  f"{name} applies to generation tasks", code="invalid_parameters")
        grammar = None if labels or module.manifest.labels else self._grammar(p)
        jobs = []
        for one in inputs:
            ids = module.encode(one)
            length = module.pass_length(len(ids))
            if length > s.max_input_tokens:
                raise TooLarge(f"input is {len(ids)} tokens and makes a pass of {length}; "
                               f"the limit is {s.max_input_tokens}", code="input_too_long")
            if labels or module.manifest.labels:
                sampling = None
                cost = label_cost(list(labels.values()) if labels else module.label_ids, length)
            else:
                sampling = Sampling(
                    max_new_tokens=max_new,
                    temperature=p.temperature if p.temperature is not None else gen.temperature,
                    top_p=p.top_p if p.top_p is not None else gen.top_p,
                    top_k=p.top_k if p.top_k is not None else gen.top_k,
                    seed=p.seed,
                    stop=p.stop if p.stop is not None else gen.stop,
                    logprobs=p.logprobs, grammar=grammar)
                cost = length + n * max_new  # one prefill, n samples decoded
            jobs.append(Job(module, ids, sampling, cost + module.probe_tokens(len(ids)), on_text=on_text, task=task,
                            labels=labels, n=n if sampling is not None else 1))
        return jobs

    def _grammar(self, p: InferParameters):
        """The compiled grammar of the request's json_schema or regex (modules.core.constraint), or
        None; 422 naming the parameter when both are given or the engine cannot compile it."""
        asked = [(name, spec) for name, spec in (("json_schema", p.json_schema), ("regex", p.regex)) if spec is not None]
        if not asked:
            return None
        if len(asked) > 1:
            raise Invalid("json_schema and regex: give one of them, not both", code="invalid_parameters")
        name, spec = asked[0]
        constraint = Constraint.json_schema(spec) if name == "json_schema" else Constraint.regex(spec)
        try:
            return grammars_for(self.backbone).compile(constraint)
        except ConstraintError as e:
            raise Invalid(f"{name}: {e}", code="invalid_parameters") from None

    @staticmethod
    def _choices(module, choices: list[str]) -> dict[str, list[int]]:
        """A request's answer choices as continuation token ids, each within a label's length cap."""
        out = {}
        for c in choices:
            ids = module.tokenizer(c, add_special_tokens=False)["input_ids"]
            if not 1 <= len(ids) <= MAX_LABEL_TOKENS:
                raise Invalid(f"choice {c!r} is {len(ids)} tokens; a choice is 1 to {MAX_LABEL_TOKENS}",
                              code="invalid_choices")
            out[c] = ids
        return out

    def _run(self, jobs: list[Job], disconnected=None):
        """Queue the jobs now (413 or 429 raise here, before a stream starts) and return the
        awaitable of their results (see `_wait`)."""
        self.scheduler.submit(jobs)
        metrics.QUEUE_DEPTH.set(self.scheduler.depth)
        return self._wait(jobs, disconnected)

    async def _wait(self, jobs: list[Job], disconnected=None) -> list:
        """Wait for the queued jobs, up to the request deadline (504). A client that goes away
        (`disconnected()` turns true, or this coroutine is cancelled) cancels its jobs: queued ones
        never run, running rows stop at the next decode step."""
        waiting = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=0.25)
                if done:
                    return waiting.result()
                if time.monotonic() > deadline:
                    raise Timeout(f"request did not finish within {self.settings.request_timeout_s:g}s",
                                  code="deadline_exceeded")
                if disconnected is not None and await disconnected():
                    raise ClientGone("the client closed the connection", code="client_closed_request")
        except BaseException:
            for j in jobs:
                j.cancel()
            waiting.cancel()
            waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: nothing to log
            raise

    @staticmethod
    def _output(result, info: dict | None = None) -> Output:
        extra = {"passages": info["passages"]} if info and "passages" in info else {}
        if isinstance(result, Scored):
            return Output(text=result.label, finish_reason="label", label=result.label, scores=result.scores, **extra)
        if result.logprobs is not None:
            extra["logprobs"] = logprobs_out(result.logprobs)
        return Output(text=result.text, finish_reason=result.finish_reason, **extra)

    def _response(self, resolved, jobs, results, t0: float) -> InferResponse:
        """One output per input, or with n samples n per input, input by input."""
        completion = sum(len(g.token_ids) for r in results for g in _samples(r) if hasattr(g, "token_ids"))
        timings = {"queue": max(j.started - j.enqueued for j in jobs) * 1e3,
                   "inference": max(j.finished - j.started for j in jobs) * 1e3,
                   "total": (time.monotonic() - t0) * 1e3}
        return InferResponse(task=resolved.name, version=resolved.version,
                             outputs=[self._output(g, j.info) for j, r in zip(jobs, results) for g in _samples(r)],
                             usage=Usage(prompt_tokens=sum(len(j.ids) for j in jobs), completion_tokens=completion),
                             timings_ms={k: round(v, 2) for k, v in timings.items()})

    async def infer(self, name: str, inputs: list, params: InferParameters, disconnected=None,
                    caller: str = "") -> InferResponse:
        """Run a task on inputs (texts, or chat message lists) and wait for every answer. `caller`
        (who sent the request) and the task choose the request's line in the queue."""
        self._require_ready()
        t0 = time.monotonic()
        resolved = await run_in_threadpool(self._resolve, name)
        context = await self._context(resolved)
        with metrics.track(resolved.name, resolved.module.kind):
            jobs = await run_in_threadpool(self._jobs, resolved.name, resolved.module, inputs, params)
            for j in jobs:
                j.context, j.caller = context, caller
            results = await self._run(jobs, disconnected)
        return self._response(resolved, jobs, results, t0)

    def _search_job(self, view, query: str, k: int, method: str) -> Job:
        tokens = min(len(self.backbone.tokenizer(query)["input_ids"]), self._documents.max_tokens)
        return Job(None, [], None, tokens, work=lambda: view.search(query, k, method))

    async def search(self, name: str, query: str, k: int, method: str) -> list:
        """The task's best k documents for the query, [(Document, score)]. A dense or hybrid search
        embeds the query with the backbone: that pass is a job in the queue like any other (counted
        in its depth, 429 when it is full). One that needs dense vectors the task lacks starts
        their indexing and waits for it (up to the request deadline)."""
        self._require_ready()
        view = await self._documents_view(name, method)
        if method == "bm25":  # no backbone pass
            return await run_in_threadpool(view.search, query, k, method)
        job = await run_in_threadpool(self._search_job, view, query, k, method)
        [hits] = await self._run([job])
        return hits

    async def stream(self, name: str, one_input, params: InferParameters,
                     caller: str = "") -> AsyncIterator[tuple[str, object]]:
        """Run a task on one input, streaming: ("text", Piece) per new piece of any sample, then
        ("done", response) or ("error", {"code", "message"}). Errors before the first event raise
        as usual."""
        self._require_ready()
        t0 = time.monotonic()
        resolved = await run_in_threadpool(self._resolve, name)
        context = await self._context(resolved)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Piece] = asyncio.Queue()
        asked = params.logprobs is not None

        def on_text(text: str, tokens: list, index: int) -> None:  # on the engine thread
            piece = Piece(index, text, logprobs_out(tokens) if asked else None)
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        jobs = await run_in_threadpool(self._jobs, resolved.name, resolved.module, [one_input], params, on_text)
        for j in jobs:
            j.context, j.caller = context, caller
        task = asyncio.ensure_future(self._run(jobs))

        async def events() -> AsyncIterator[tuple[str, object]]:
            getter = None
            try:
                with metrics.track(resolved.name, resolved.module.kind):
                    while not (task.done() and pieces.empty()):
                        getter = asyncio.ensure_future(pieces.get())
                        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            yield "text", getter.result()
                        else:
                            getter.cancel()
                    results = task.result()
                yield "done", self._response(resolved, jobs, results, t0)
            except Exception as e:  # noqa: BLE001 - the status line is sent already: report in-band
                known = isinstance(e, ServiceError)
                if not known:
                    log.exception("stream for task %s failed", name)
                yield "error", {"code": e.code if known else "internal_error",
                                "message": e.message if known else "internal server error"}
            finally:  # also when the client goes away mid-stream (the generator is closed)
                if getter is not None:
                    getter.cancel()
                task.cancel()

        return events()
