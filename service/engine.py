"""The engine: one thread owns the backbone and runs batches from the scheduler.

A batch mixes rows of any tasks; classification rows are scored in one pass, generation rows
decoded together with one KV cache. Each job's future gets its own result.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from modules.backbone import Backbone
from modules.decode import GenItem, ScoreItem, generate, score
from modules.stages import prepare
from service.scheduler import Job, Scheduler

log = logging.getLogger("frozenlm.engine")


@dataclass(frozen=True)
class Scored:
    label: str
    scores: dict[str, float]


class Engine:
    def __init__(self, backbone: Backbone, scheduler: Scheduler, on_batch=None, on_cancel=None,
                 lock: threading.Lock | None = None):
        self.backbone, self.scheduler = backbone, scheduler
        # held for each batch: other threads' backbone passes (document embedding) take it too
        self.lock = lock or threading.Lock()
        self.on_batch = on_batch    # callback(jobs, results, seconds), for metrics
        self.on_cancel = on_cancel  # callback(number of queued jobs skipped), for metrics
        self._thread = threading.Thread(target=self._loop, name="frozenlm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking requests, finish what is queued, then return."""
        self.scheduler.close()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            jobs = self.scheduler.next_batch()
            if not jobs:
                if self.scheduler.closed:
                    return
                continue
            self.run(jobs)

    def run(self, jobs: list[Job]) -> None:
        runnable = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # skip cancelled requests
        if self.on_cancel and len(runnable) < len(jobs):
            self.on_cancel(len(jobs) - len(runnable))
        jobs = runnable
        if not jobs:
            return
        start = time.monotonic()
        for j in jobs:
            j.started = start
        try:
            with self.lock, torch.inference_mode():
                results = self._compute(jobs)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("batch of %d failed", len(jobs))
            for j in jobs:
                j.future.set_exception(e)
            return
        end = time.monotonic()
        for j, r in zip(jobs, results):
            j.finished = end
            j.future.set_result(r)
        if self.on_batch:
            self.on_batch(jobs, results, end - start)

    def _compute(self, jobs: list[Job]) -> list:
        results: list = [None] * len(jobs)
        rows = prepare(self.backbone, [(j.module, j.ids) for j in jobs])  # probes of every row together
        for j, r in zip(jobs, rows):
            j.info = r.info
        scoring = [i for i, j in enumerate(jobs) if j.sampling is None]
        if scoring:
            items = [ScoreItem(rows[i].ids, rows[i].contribution, jobs[i].module.label_ids) for i in scoring]
            for i, ll in zip(scoring, score(self.backbone, items)):
                names = list(jobs[i].module.manifest.labels)
                probs = torch.softmax(ll.float(), -1).tolist()
                results[i] = Scored(names[int(ll.argmax())], dict(zip(names, probs)))
        gen = [i for i, j in enumerate(jobs) if j.sampling is not None]
        if gen:
            items = [GenItem(rows[i].ids, rows[i].contribution, jobs[i].sampling, jobs[i].on_text,
                             stop_requested=lambda j=jobs[i]: j.cancelled) for i in gen]
            for i, g in zip(gen, generate(self.backbone, items)):
                results[i] = g
        return results
