"""The queue between the API and the engine: bounded, fair across lines, batches across tasks.

`submit` never waits: a full queue answers 429 with Retry-After. Each line (a task and a caller:
the key's name, else the client's address) holds its jobs in arrival order; `next_batch` takes the
lines' oldest jobs in turn (round robin, as LoRAX serves its adapters), up to a row count and a
token budget. So a caller that queued many large requests holds a later request of another task
or caller back by one turn, not by its whole backlog.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field

from service.errors import Overloaded, TooLarge, Unavailable


@dataclass(eq=False)
class Job:
    """One row of work: a module, its token ids, and either sampling settings or label scoring;
    or a backbone pass of its own (`work`, a dense document search), run on the engine thread."""

    module: object               # modules.core.module.TaskModule (kept untyped: no torch import here)
    ids: list[int]
    sampling: object | None      # modules.core.decode.Sampling; None = score the module's labels
    cost: int                    # tokens this job puts through the backbone (its share of a batch's budget)
    task: str = ""               # the task's name (metrics, the queue's lines)
    caller: str = ""             # who sent it (service.security.caller; the queue's lines)
    labels: dict | None = None   # scoring: {name: continuation ids} (a request's choices); None = the module's labels
    n: int = 1                   # generation: samples of this prompt (one prefill; each a row of its own)
    context: object | None = None  # modules.core.stages.Context: what the request brings (its task's documents)
    on_text: object | None = None  # streaming: called (piece, token logprobs, sample index)
    work: object | None = None   # callable run with the backbone lock held, in place of a row
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float = 0.0
    finished: float = 0.0
    cancelled: bool = False      # the client went away: skip it, or stop its row at the next step
    info: dict | None = None     # what the module reported while preparing the row (rrr: its passages)

    def cancel(self) -> None:
        self.cancelled = True
        self.future.cancel()  # succeeds only while queued


class Scheduler:
    def __init__(self, max_queue: int = 256, max_batch_size: int = 32, max_batch_tokens: int = 16384):
        self.max_queue, self.max_batch_size, self.max_batch_tokens = max_queue, max_batch_size, max_batch_tokens
        self._lines: OrderedDict[Hashable, deque[Job]] = OrderedDict()  # line -> its queued jobs; the first line's turn is next
        self._cond = threading.Condition()
        self._closed = False

    @property
    def depth(self) -> int:
        """Queued rows (a job of n samples counts n)."""
        return sum(j.n for line in self._lines.values() for j in line)

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs; 413 for jobs that could never fit (`check_fits`), 429 while the queue has
        no room for them."""
        self.check_fits(jobs)
        with self._cond:
            if self._closed:
                raise Unavailable("server is shutting down", code="shutting_down")
            if self.depth + sum(j.n for j in jobs) > self.max_queue:
                raise Overloaded(f"queue is full ({self.depth} rows waiting); retry later",
                                 code="queue_full", headers={"Retry-After": "1"})
            for job in jobs:
                self._lines.setdefault(self.line(job), deque()).append(job)
            self._cond.notify()

    @staticmethod
    def line(job: Job) -> Hashable:
        """The line a job waits in: its task's and its caller's."""
        return job.task, job.caller

    def check_fits(self, jobs: list[Job]) -> None:
        """413 for a request that no wait would let in: more rows than the queue holds, or a row
        over the batch's token budget."""
        rows = sum(j.n for j in jobs)
        if rows > self.max_queue:
            raise TooLarge(f"{rows} rows are more than the queue holds ({self.max_queue})",
                           code="request_too_large")
        cost = max(j.cost for j in jobs)
        if cost > self.max_batch_tokens:
            raise TooLarge(f"a row needs {cost} tokens of backbone work; a batch holds {self.max_batch_tokens}",
                           code="request_too_large")

    def next_batch(self, timeout: float = 0.5, rows: int | None = None, fits=None) -> list[Job]:
        """Jobs taken in turn from the lines, oldest first within a line, up to `rows` rows
        (at most max_batch_size; a job of n samples is n rows, and the first job is always taken); []
        on timeout or close. A line whose job is taken goes to the back of the turn; a line whose
        next job does not fit keeps its place, so its job goes first when there is room.
        Without `fits`, within max_batch_tokens of cost. With `fits` (a predicate on the jobs taken
        so far plus the next: room left in a running batch), a job is taken only if it fits, so none
        may be taken; once a generation job did not fit, no generation job of another line is taken
        past it (a stream of small ones would starve it), but jobs that take no room in the running
        batch (scoring, a pass of their own) still are."""
        rows = self.max_batch_size if rows is None else min(rows, self.max_batch_size)
        with self._cond:
            if not self._lines and timeout > 0:
                self._cond.wait(timeout)
            batch, live, used, taken = [], [], 0, 0
            held: set[Hashable] = set()  # lines whose next job did not fit
            blocked = False         # a generation job did not fit (only with `fits`)
            more = True
            while more:
                more = False
                for key in list(self._lines):
                    line = self._lines[key]
                    while line and line[0].cancelled:  # its request went away: handed over to be counted, it takes no room
                        batch.append(line.popleft())
                    if key not in held and line:
                        job = line[0]
                        if (blocked and job.sampling is not None) or not self._room(job, live, taken, used, rows, fits):
                            held.add(key)
                            blocked = blocked or (fits is not None and job.sampling is not None)
                        else:
                            batch.append(line.popleft())
                            live.append(job)
                            used += job.cost
                            taken += job.n
                            more = True
                            self._lines.move_to_end(key)
                    if not line:
                        del self._lines[key]
            return batch

    def _room(self, job: Job, live: list[Job], taken: int, used: int, rows: int, fits) -> bool:
        """Whether `job` joins the `live` jobs taken so far (`taken` rows, `used` cost)."""
        if live and taken + job.n > rows:
            return False
        if fits is not None:
            return fits(live + [job])
        return not live or used + job.cost <= self.max_batch_tokens

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
