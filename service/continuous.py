"""The iteration-level engine: rows join and leave the running batch at every decode step.

Each step of the engine thread:

    queue --admit (tasks in turn, within max_running and the KV budget)--> prepare: probes of the admitted
    rows, batched (idpt, rrr, recursive) --> scoring rows: one pass, answered now
                                         --> generation rows: prefilled together, join the batch
    running batch --one decode token for every running row--> finished rows answered and gone

So a one-pass request that arrives while long generations run waits for one step, not for the
longest generation. A job of n samples is prefilled once and decodes as n rows; it is answered
when its last sample finishes. A row keeps the module object it started with (a hot-swapped version applies
to later requests), streams as it goes, and stops at the next step once its caller gives up.
"""

from __future__ import annotations

import logging
import time

import torch

from modules.core.prefix_cache import PrefixCache, content_key
from modules.core.running import RunningBatch
from modules.core.stages import prepare
from service.engine import Engine, job_result, per_row, sample_items, score_jobs
from service.scheduler import Job

log = logging.getLogger("frozenlm.engine")


class ContinuousEngine(Engine):
    """`Engine`'s interface, scheduled per step. `kv_tokens` bounds the running batch's key/value
    buffer (slots x columns, see `RunningBatch.fits`): a row joins only if the buffer stays within
    it until a row leaves, with every row at its max_new_tokens; a job alone on an idle engine
    always runs (the request limits bound it). `max_running` bounds the generation rows decoded
    together; `prefill_tokens` bounds the prompt tokens prefilled per step (longer prompts take
    several steps, so running rows keep decoding); `prefix_cache_tokens` bounds the cached
    keys/values of rows' leading tokens."""

    def __init__(self, backbone, scheduler, on_batch=None, on_cancel=None, lock=None,
                 max_running: int = 32, kv_tokens: int = 65536, prefill_tokens: int = 512,
                 prefix_cache_tokens: int = 8192, on_step=None):
        super().__init__(backbone, scheduler, on_batch=on_batch, on_cancel=on_cancel, lock=lock)
        self.max_running, self.kv_tokens = max_running, kv_tokens
        self.on_step = on_step  # callback(batch, seconds, jobs decoded, jobs given their first token), for metrics
        self.batch = RunningBatch(backbone, PrefixCache(prefix_cache_tokens), prefill_tokens)
        self._running: dict[int, tuple[Job, int]] = {}  # id(GenItem) -> its job and sample index
        self._samples: dict[Job, list] = {}              # a running job -> its samples' results so far

    def _fits(self, jobs: list[Job]) -> bool:
        """Whether the generation rows among `jobs` can join: within `max_running` rows and the KV
        budget (a job's cost is its prompt's positions plus n times its max_new_tokens; each of its n
        samples takes a slot). Scoring rows run in this step and leave, so a full running batch
        never holds them back."""
        rows = [(j.cost - j.n * j.sampling.max_new_tokens, j.sampling.max_new_tokens)
                for j in jobs if j.sampling is not None for _ in range(j.n)]
        return len(self._running) + len(rows) <= self.max_running and self.batch.fits(rows, self.kv_tokens)

    def _loop(self) -> None:
        while True:
            idle = not self._running
            jobs = self.scheduler.next_batch(timeout=0.5 if idle else 0,
                                             fits=lambda jobs, idle=idle: (idle and len(jobs) == 1) or self._fits(jobs))
            if jobs:
                self._admit_each(jobs)
            elif idle:
                if self.scheduler.closed:
                    return
                continue
            if self._running:
                self._step()

    def _admit_each(self, jobs: list[Job]) -> None:
        """Admit the jobs together; if that fails in a way no row was blamed for, admit each alone,
        so only the jobs that fail alone fail (the engine thread never dies of a request)."""
        try:
            self._admit(jobs)
        except Exception as e:  # noqa: BLE001
            if len(jobs) == 1:
                log.exception("admitting a row of task kind %s failed", getattr(jobs[0].module, "kind", "?"))
                if not jobs[0].future.done():
                    self._answer([(jobs[0], e)])
                return
            running = {j for j, _ in self._running.values()}
            for job in jobs:
                if not job.future.done() and job not in running:
                    self._admit_each([job])

    def _admit(self, jobs: list[Job]) -> None:
        runnable = [j for j in jobs if j.future.running()] + self._start([j for j in jobs if not j.future.running()])
        self._answer([(j, self._own_pass(j)) for j in runnable if j.work is not None])
        runnable = [j for j in runnable if j.work is None]
        if not runnable:
            return
        with self.lock, torch.inference_mode():
            rows = prepare(self.backbone, [(j.module, j.ids, j.context) for j in runnable], isolate=True)
            ready = []
            for j, r in zip(runnable, rows):
                j.info = r.info
                if r.error is not None:
                    log.error("task kind %s failed to prepare its row: %s: %s", j.module.kind, type(r.error).__name__, r.error)
                    self._answer([(j, r.error)])
                else:
                    ready.append((j, r))
            self._score([(j, r) for j, r in ready if j.sampling is None])
            self._join([(j, r) for j, r in ready if j.sampling is not None])

    def _score(self, pairs: list) -> None:
        """One pass for every scoring row admitted; a pass that fails runs each row alone."""
        if not pairs:
            return
        try:
            results = score_jobs(self.backbone, pairs, self.batch.prefix_cache)
        except Exception as e:  # noqa: BLE001 - only the rows that fail alone fail
            if len(pairs) == 1:
                log.exception("a row of task kind %s failed", pairs[0][0].module.kind)
                return self._answer([(pairs[0][0], e)])
            for pair in pairs:
                self._score([pair])
            return
        self._answer([(j, r) for (j, _), r in zip(pairs, results)])

    def _join(self, pairs: list) -> None:
        """The admitted generation rows join the running batch (their prefill runs in the next
        steps): a job's n samples join as the samples of one prompt, prefilled once."""
        for j, r in pairs:
            items = sample_items(j, r, prefix_key=content_key(j.module))
            self.batch.join_samples(items)
            self._running.update({id(it): (j, i) for i, it in enumerate(items)})
            self._samples[j] = [None] * j.n

    def _step(self) -> None:
        start = time.monotonic()
        stepped = list(self._samples)
        try:
            with self.lock:
                done = self.batch.step()
        except Exception as e:  # noqa: BLE001 - not one row's fault (a row's is caught in the batch): all fail
            log.exception("a decode step of %d rows failed", len(self._running))
            self.batch = RunningBatch(self.backbone, self.batch.prefix_cache, self.batch.prefill_tokens)
            self._running.clear()
            self._samples.clear()
            return self._answer([(j, e) for j in stepped])
        seconds = time.monotonic() - start
        if self.on_step:
            jobs = lambda items: [self._running[id(it)][0] for it in items]  # noqa: E731
            self.on_step(self.batch, seconds, jobs(self.batch.decoded), jobs(self.batch.first))
        answers = []
        for it, g in done:
            j, i = self._running.pop(id(it))
            samples = self._samples.get(j)
            if samples is None:  # its job was answered already (another sample failed)
                continue
            samples[i] = g
            if g.error is not None or all(s is not None for s in samples):
                del self._samples[j]
                if g.error is not None:
                    j.cancelled = True  # its other samples stop at the next step
                answers.append((j, job_result(j, [s for s in samples if s is not None])))
        self._answer(answers)

    def _answer(self, results: list) -> None:
        end = time.monotonic()
        for j, r in results:
            j.finished = end
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
        done = per_row([(j, r) for j, r in results if not isinstance(r, BaseException)])
        if self.on_batch and done:
            self.on_batch(*map(list, zip(*done)), end - min(j.started for j, _ in done))
