"""Turns across lines (a task and a caller): one line's backlog of large requests holds a later
request of another line back by one turn, not by the whole backlog; a generation job that does not
fit is not starved by later small ones; and the order changes nothing in what a row gets."""

from __future__ import annotations

from modules.core.decode import Sampling
from modules.kinds.base import NoModule
from service.continuous import ContinuousEngine
from service.scheduler import Job, Scheduler
from tests.test_continuous import _alone, _wait
from tests.test_engine import _same


def _gen(task: str, n: int = 1, max_new: int = 4, caller: str = "") -> Job:
    return Job(None, [1, 2], Sampling(max_new_tokens=max_new), cost=2 + n * max_new, task=task, n=n, caller=caller)


def _score(task: str) -> Job:
    return Job(None, [1, 2], None, cost=3, task=task)


def _rows(limit: int):
    """`fits` for a running batch with `limit` free rows."""
    return lambda jobs: sum(j.n for j in jobs) <= limit


def test_tasks_take_turns_and_each_task_keeps_its_order():
    s = Scheduler()
    a = [_gen("a") for _ in range(4)]
    b = [_gen("b") for _ in range(2)]
    s.submit(a)
    s.submit(b)
    assert s.depth == 6
    assert s.next_batch(rows=3) == [a[0], b[0], a[1]]
    assert s.next_batch(rows=8) == [b[1], a[2], a[3]]
    assert s.depth == 0 and s.next_batch(timeout=0) == []


def test_callers_of_one_task_take_turns():
    s = Scheduler()
    a = [_gen("t", caller="key a") for _ in range(3)]
    b = _gen("t", caller="key b")
    s.submit(a)
    s.submit([b])
    assert [s.next_batch(rows=1) for _ in range(3)] == [[a[0]], [b], [a[1]]]


def test_a_backlog_holds_another_task_back_by_one_turn():
    """Room for one job at a time: task a queued five jobs of 4 samples, then task b one short job.
    FIFO would answer b after all five; in turns it runs second."""
    s = Scheduler()
    a = [_gen("a", n=4, max_new=64) for _ in range(5)]
    b = _gen("b", max_new=2)
    s.submit(a)
    s.submit([b])
    one = _rows(4)
    assert [s.next_batch(fits=one) for _ in range(4)] == [[a[0]], [b], [a[1]], [a[2]]]


def test_a_generation_job_that_does_not_fit_keeps_its_turn():
    """Small generation jobs of other tasks do not pass a large one waiting for room (they would
    starve it); a scoring job, which takes no room in the running batch, does; once there is room
    the large job goes first."""
    s = Scheduler()
    big = _gen("a", n=8)
    smalls = [_gen(t) for t in "bcd"]
    s.submit([big])
    s.submit(smalls)
    assert s.next_batch(fits=_rows(2)) == []
    scorer = _score("e")
    s.submit([scorer])
    assert s.next_batch(fits=_rows(2)) == [scorer]
    assert s.next_batch(fits=_rows(9)) == [big, smalls[0]]
    assert s.next_batch(fits=_rows(9)) == smalls[1:]


def test_without_a_running_batch_a_job_over_the_token_budget_goes_first_next_time():
    """The static engine's batches: a job that would take the batch over its token budget keeps its
    place and opens the next batch; smaller jobs of other tasks may fill this one."""
    s = Scheduler(max_batch_tokens=10)
    first, big, small, later = _gen("a"), Job(None, [1], None, cost=9, task="b"), _gen("c", max_new=1), _gen("c")
    s.submit([first, big])
    s.submit([small, later])
    assert s.next_batch() == [first, small]  # 6 + 3 tokens; big's 9 would not fit
    assert s.next_batch() == [big]           # first in turn now, alone: later's 6 would not fit beside it
    assert s.next_batch() == [later]


def test_cancelled_jobs_leave_the_lines_and_take_no_turn():
    s = Scheduler()
    a = [_gen("a") for _ in range(3)]
    s.submit(a)
    a[0].cancel()
    assert s.next_batch(rows=1) == [a[0], a[1]]


def test_on_the_engine_a_short_request_of_another_task_runs_after_one_turn(tiny):
    """On the iteration-level engine with room for 4 rows: task a queues four jobs of 4 samples x 12
    tokens, then task b one of 2 tokens. b starts as soon as a's first job leaves (before a's second
    starts) and every job gets what it gets alone."""
    base = NoModule(tiny)

    def job(task: str, text: str, n: int, max_new: int) -> Job:
        ids = base.encode(text)
        return Job(base, ids, Sampling(max_new_tokens=max_new, ignore_eos=True, temperature=0.7, seed=5),
                   len(ids) + n * max_new, task=task, n=n)

    makers = [lambda i=i: job("a", f"long {i}", 4, 12) for i in range(4)] + [lambda: job("b", "short", 1, 2)]
    alone = [_alone(tiny, make) for make in makers]
    jobs = [make() for make in makers]
    engine = ContinuousEngine(tiny, Scheduler(max_queue=64), max_running=4)
    engine.scheduler.submit(jobs[:4])
    engine.scheduler.submit(jobs[4:])
    engine.start()
    try:
        got = _wait(jobs)
    finally:
        engine.stop()
    a, b = jobs[:4], jobs[4]
    assert a[0].finished <= b.started < a[1].started
    assert b.finished < a[1].finished
    for x, y in zip(got, alone):
        if isinstance(x, list):
            assert len(x) == len(y) and all(_same(g, h) for g, h in zip(x, y))
        else:
            assert _same(x, y)


def test_a_request_waits_in_the_line_of_its_task_and_its_caller(tmp_path, tiny, monkeypatch):
    """Over HTTP (/infer, OpenAI completions, streamed too): a request with a known key waits in the
    line of its task and its key's name; one without a key in its client address's line."""
    import json

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    lines = []
    submit = Scheduler.submit
    monkeypatch.setattr(Scheduler, "submit", lambda self, jobs: lines.extend(map(self.line, jobs)) or submit(self, jobs))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"name": "team-a", "key": "key-a", "scopes": ["infer:*"]},
                                {"name": "team-b", "key": "key-b", "scopes": ["infer:*"]}]))
    settings = Settings(store_dir=tmp_path / "store", examples=False, api_keys_file=keys, max_new_tokens=4,
                        _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        for key in ("key-a", "key-b"):
            auth = {"Authorization": f"Bearer {key}"}
            assert c.post("/tasks/base/infer", json={"inputs": "x"}, headers=auth).status_code == 200
            assert c.post("/tasks/base/infer", json={"inputs": "x", "stream": True}, headers=auth).status_code == 200
            assert c.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2},
                          headers=auth).status_code == 200
    assert lines == [("base", "key team-a")] * 3 + [("base", "key team-b")] * 3
    lines.clear()
    settings = Settings(store_dir=tmp_path / "store2", examples=False, max_new_tokens=4, _env_file=None)
    with TestClient(create_app(settings, backbone=tiny, wait_ready=True)) as c:
        assert c.post("/tasks/base/infer", json={"inputs": "x"}).status_code == 200
    assert lines == [("base", "address testclient")]
