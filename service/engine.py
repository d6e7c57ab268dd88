"""The engine: one thread owns the backbone and runs batches from the scheduler.

A batch mixes rows of any tasks; classification rows are scored in one pass, generation rows
decoded together with one KV cache. Each job's future gets its own result: a generation job of
n samples (`Job.n`) gets the list of its n `Generated`, sample i seeded seed + i, all n from one
prefill of its prompt (both engines run them through `RunningBatch.join_samples`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass

import torch

from modules.core.backbone import Backbone
from modules.core.calibration import label_probs
from modules.core.decode import Generated, GenItem, RowError, ScoreItem, score
from modules.core.prefix_cache import PrefixCache, content_key, row_kv
from modules.core.running import generate
from modules.core.stages import prepare
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

    def _start(self, jobs: list[Job]) -> list[Job]:
        """The jobs whose requests still wait (cancelled ones are skipped and counted), marked started."""
        runnable = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if self.on_cancel and len(runnable) < len(jobs):
            self.on_cancel(len(jobs) - len(runnable))
        start = time.monotonic()
        for j in runnable:
            j.started = start
            _fix_seed(j)
            if j.on_text is not None:
                j.on_text = _Once(j.on_text)
        return runnable

    def run(self, jobs: list[Job]) -> None:
        jobs = self._start(jobs)
        if not jobs:
            return
        start = time.monotonic()
        rows = [j for j in jobs if j.work is None]
        done = dict(zip(rows, self._isolated(rows))) if rows else {}
        done.update((j, self._own_pass(j)) for j in jobs if j.work is not None)
        results = [done[j] for j in jobs]
        end = time.monotonic()
        for j, r in zip(jobs, results):
            j.finished = end
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
        if self.on_batch:
            done = per_row([(j, r) for j, r in zip(jobs, results) if not isinstance(r, BaseException)])
            if done:
                self.on_batch(*map(list, zip(*done)), end - start)

    def _own_pass(self, job: Job):
        """A job's own backbone pass (`job.work`): its result or its exception."""
        try:
            with self.lock, torch.inference_mode():
                return job.work()
        except Exception as e:  # noqa: BLE001 - its request hears about it
            log.exception("a backbone pass of its own failed")
            return e

    def _isolated(self, jobs: list[Job]) -> list:
        """Each job's result or its own exception. A module that fails on its own row fails that row
        only (see `_compute`); a failure of the whole pass that cannot be pinned on a row reruns every
        row alone, so only the rows that fail alone fail."""
        try:
            with self.lock, torch.inference_mode():
                return self._compute(jobs)
        except Exception as e:  # noqa: BLE001 - every waiting request must hear about it
            if len(jobs) == 1:
                log.exception("a row of task kind %s failed", jobs[0].module.kind)
                return [e]
            log.warning("a batch of %d rows failed (%s: %s); running each row alone", len(jobs), type(e).__name__, e)
            return [self._isolated([j])[0] for j in jobs]

    def _compute(self, jobs: list[Job]) -> list:
        results: list = [None] * len(jobs)
        rows = prepare(self.backbone, [(j.module, j.ids, j.context) for j in jobs], isolate=True)  # probes of every row together
        for i, (j, r) in enumerate(zip(jobs, rows)):
            j.info = r.info
            if r.error is not None:
                log.error("task kind %s failed to prepare its row: %s: %s", j.module.kind, type(r.error).__name__, r.error)
                results[i] = r.error
        ok = [i for i in range(len(jobs)) if results[i] is None]
        scoring = [i for i in ok if jobs[i].sampling is None]
        for i, r in zip(scoring, score_jobs(self.backbone, [(jobs[i], rows[i]) for i in scoring])):
            results[i] = r
        gen = [i for i in ok if jobs[i].sampling is not None]
        if gen:
            for i, g in zip(gen, generate(self.backbone, [sample_items(jobs[i], rows[i]) for i in gen])):
                results[i] = job_result(jobs[i], g)
        return results


def sample_items(job: Job, row, prefix_key: str | None = None) -> list[GenItem]:
    """The n samples of a generation job's prepared row: sample i with its own seed stream
    (`Sampling.for_sample`), streaming as index i; they share the row's ids and contribution, so
    `RunningBatch.join_samples` prefills the prompt once."""
    return [GenItem(row.ids, row.contribution, job.sampling.for_sample(i), job.on_text and job.on_text.attempt(i),
                    stop_requested=lambda: job.cancelled, prefix_key=prefix_key) for i in range(job.n)]


def job_result(job: Job, samples: list[Generated]):
    """A generation job's result from its samples: the one Generated (n = 1) or the list of n; a
    sample's error fails the whole job."""
    for g in samples:
        if g.error is not None:
            return g.error
    return samples[0] if job.n == 1 else samples


def per_row(done: list) -> list:
    """(job, result) pairs with a job of n samples as n pairs, one per sample (metrics count rows)."""
    return [(j, g) for j, r in done for g in (r if isinstance(r, list) else [r])]


def score_jobs(backbone, pairs: list, prefix_cache: PrefixCache | None = None) -> list:
    """Each classification (job, prepared row)'s Scored (or RowError): rows whose labels are all
    one token in one pass, the others in another (one row per label), as `label_cost` counts them.
    With a prefix cache, a row starts from its cached leading blocks and leaves its own there."""
    results: dict[int, object] = {}
    labels = [job_labels(j) for j, _ in pairs]
    keys = [content_key(j.module) if prefix_cache is not None else None for j, _ in pairs]
    one_pass = [k for k in range(len(pairs)) if one_token(labels[k].values())]
    for group in (one_pass, [k for k in range(len(pairs)) if k not in one_pass]):
        if not group:
            continue
        items = []
        for k in group:
            row = pairs[k][1]
            h, kv = prefix_cache.lookup(keys[k], row.ids) if keys[k] else (0, None)
            c = row.contribution if kv is None else row.contribution.continued(kv)
            items.append(ScoreItem(row.ids[h:], c, list(labels[k].values())))

        def remember(mask, cache, rows, group=group):
            for k, b in zip(group, rows):
                if keys[k]:
                    c = pairs[k][1].contribution
                    prefix_cache.insert(keys[k], pairs[k][1].ids, *row_kv(mask, cache, b),
                                        c.prefix_length + c.num_virtual_tokens)
        keep = remember if any(keys[k] for k in group) else None  # no cache to fill: a plain pass
        for k, ll in zip(group, score(backbone, items, on_pass=keep)):
            job = pairs[k][0]
            probs = (label_probs(backbone, job.module, [ll])[0] if job.labels is None  # the task's own scoring
                     else torch.softmax(ll.double(), -1))
            results[k] = _scored(list(labels[k]), ll, probs)
    return [results[k] for k in range(len(pairs))]


def job_labels(job: Job) -> dict[str, list[int]]:
    """What a scoring job chooses between: the request's choices, else its task's labels."""
    if job.labels is not None:
        return job.labels
    return dict(zip(job.module.manifest.labels, job.module.label_ids))


def one_token(continuations) -> bool:
    return all(len(c) == 1 for c in continuations)


def label_cost(continuations: list[list[int]], length: int) -> int:
    """Tokens a classification row of pass length `length` puts through the backbone: one row when
    every label is one token (read the next-token distribution), else one row per label with the
    label appended (decode.score)."""
    if one_token(continuations):
        return length
    return sum(length + len(c) for c in continuations)


def _scored(names: list[str], ll: torch.Tensor, probs: torch.Tensor) -> Scored | RowError:
    """The label and label probabilities from each label's log-likelihood and probability, (K,)."""
    if not (torch.isfinite(ll).all() and torch.isfinite(probs).all()):
        return RowError("the task's module produced non-finite label scores")
    return Scored(names[int(probs.argmax())], dict(zip(names, probs.tolist())))


def _fix_seed(job: Job) -> None:
    """Give an unseeded sampled row a seed of its own, so that running it again (alone, after its
    batch failed) reproduces the text it may already have streamed."""
    s = job.sampling
    if s is not None and s.temperature > 0 and s.seed is None:
        s.seed = random.getrandbits(63)


class _Once:
    """A job's streaming callback that never sends the same text (or token logprob) twice: a row
    run again after its batch failed regenerates the same text (greedy, or seeded), and only what
    is new goes out. `attempt(i)` is the callback of sample i for one run of its row; it calls
    `send(piece, token logprobs, i)`."""

    def __init__(self, send):
        self.send = send
        self.sent: dict[int, tuple[int, int]] = {}  # sample -> (characters, tokens) sent
        self.seen: dict[int, tuple[int, int]] = {}  # sample -> (characters, tokens) seen in this run

    def attempt(self, index: int = 0):
        self.seen[index] = (0, 0)
        return lambda piece, tokens: self._emit(index, piece, tokens)

    def _emit(self, index: int, piece: str, tokens: list) -> None:
        chars, toks = self.seen[index]
        chars, toks = chars + len(piece), toks + len(tokens)
        self.seen[index] = (chars, toks)
        sent_chars, sent_toks = self.sent.get(index, (0, 0))
        new_chars, new_toks = max(chars - sent_chars, 0), max(toks - sent_toks, 0)
        if new_chars or new_toks:
            self.send(piece[len(piece) - new_chars:], tokens[len(tokens) - new_toks:], index)
            self.sent[index] = (max(chars, sent_chars), max(toks, sent_toks))
