"""The iteration-level engine on a tiny random model: short requests do not wait for long
generations, rows joining at any step get what they get alone, one row's failure stays its own."""

from __future__ import annotations

import time

import pytest

from modules.core.decode import Sampling
from modules.kinds.base import NoModule
from service.continuous import ContinuousEngine
from service.engine import Engine
from service.scheduler import Job, Scheduler
from tests.test_batching import _modules
from tests.test_engine import _broken, _job, _outcome, _prompt, _same


@pytest.fixture
def engine(tiny):
    steps = []
    e = ContinuousEngine(tiny, Scheduler(max_queue=64), on_step=lambda *a: steps.append(a))
    e.steps = steps
    e.start()
    yield e
    e.stop()


def _alone(tiny, make) -> object:
    job = make()
    Engine(tiny, Scheduler()).run([job])
    return _outcome(job)


def _wait(jobs: list[Job]) -> list:
    for j in jobs:
        j.future.exception(timeout=120)
    return [_outcome(j) for j in jobs]


def test_a_scoring_request_does_not_wait_for_long_generations(tiny, engine):
    """While rows generate 60 tokens, a classification row submitted after them finishes first,
    within a few steps, and with the scores it gets alone."""
    base = NoModule(tiny)
    longs = [_job(base, t, Sampling(max_new_tokens=60, ignore_eos=True)) for t in ("hello", "the quick brown fox")]
    engine.scheduler.submit(longs)
    while not engine.steps:  # the long rows are decoding
        time.sleep(0.005)
    scorer = _prompt(tiny, 2, labels={"yes": " yes", "no": " nope"})
    short = _job(scorer, "is it?", None)
    engine.scheduler.submit([short])
    _wait([short])
    assert not any(j.future.done() for j in longs)  # still decoding when the short one was answered
    assert _same(_outcome(short), _alone(tiny, lambda: _job(scorer, "is it?", None)))
    _wait(longs)
    assert all(j.finished > short.finished for j in longs)


def test_rows_joining_mid_decode_get_their_alone_results(tiny, engine):
    """Jobs of every kind (probing kinds included) submitted at different moments while others
    decode: each gets exactly its alone result."""
    mods = _modules(tiny)
    scorer = _prompt(tiny, 3, labels={"a": " a", "b": " bb"})
    makers = [lambda m=m, t=t, n=n: _job(m, t, Sampling(max_new_tokens=n))
              for m, t, n in zip(mods, ["a", "hello there", "xyz xyz", "the quick brown fox"] * 4, [4, 9, 14] * 6)]
    makers += [lambda: _job(scorer, "pick one", None), lambda: _job(mods[0], "seeded", Sampling(
        max_new_tokens=7, temperature=0.8, top_k=20, seed=11))]
    alone = [_alone(tiny, make) for make in makers]
    jobs = []
    for i, make in enumerate(makers):
        job = make()
        jobs.append(job)
        engine.scheduler.submit([job])
        if i % 4 == 3:
            time.sleep(0.05)  # let some steps run: later jobs join mid-decode
    got = _wait(jobs)
    assert len({len(s[2]) for s in engine.steps}) > 1  # steps decoded different numbers of rows
    for a, g in zip(alone, got):
        assert _same(g, a)


@pytest.mark.parametrize("how", ["raises", "nan", "bad_shape"])
def test_a_failing_row_fails_only_its_own_request(tiny, engine, how):
    base = NoModule(tiny)
    makers = [lambda: _job(base, "hello", Sampling(max_new_tokens=8)),
              lambda: _job(_prompt(tiny, 1), "zz top", Sampling(max_new_tokens=5))]
    alone = [_alone(tiny, make) for make in makers]
    jobs = [makers[0](), _job(_broken(tiny, how), "boom", Sampling(max_new_tokens=6)), makers[1]()]
    engine.scheduler.submit(jobs)
    got = _wait(jobs)
    assert isinstance(got[1], type) and issubclass(got[1], Exception)
    assert _same(got[0], alone[0]) and _same(got[2], alone[1])


def test_a_cancelled_row_stops_at_the_next_step(tiny, engine):
    base = NoModule(tiny)
    job = _job(base, "hello", Sampling(max_new_tokens=2000, ignore_eos=True))
    other = _job(base, "other", Sampling(max_new_tokens=20, ignore_eos=True))
    engine.scheduler.submit([job, other])
    while not engine.steps:
        time.sleep(0.005)
    job.cancelled = True
    assert job.future.result(timeout=60).finish_reason == "cancelled"
    assert other.future.result(timeout=60).finish_reason == "length"


def test_the_kv_budget_holds_rows_back_in_the_queue(tiny):
    """Rows join only while the key/value buffer (slots x columns) stays within the budget: here 8
    slots x 64 columns hold rows of up to 63 positions, so a 100-token row waits until the short
    ones have left, and then runs alone."""
    base = NoModule(tiny)
    short = [Job(base, base.encode(t), Sampling(max_new_tokens=30, ignore_eos=True), cost=40) for t in "abcd"]
    long = Job(base, base.encode("e"), Sampling(max_new_tokens=100, ignore_eos=True), cost=110)
    seen = []
    engine = ContinuousEngine(tiny, Scheduler(), kv_tokens=8 * 64,
                              on_step=lambda batch, s, decoded, first: seen.append({j.cost for j in decoded}))
    engine.scheduler.submit(short + [long])
    engine.start()
    try:
        _wait(short + [long])
    finally:
        engine.stop()
    assert {40} in seen and {110} in seen and not any(len(costs) > 1 for costs in seen)
    assert all(j.future.result().finish_reason == "length" for j in short + [long])
    assert long.started >= max(j.finished for j in short)


def test_step_metrics_time_to_first_token_and_between_tokens(tiny):
    from service import metrics

    base = NoModule(tiny)
    engine = ContinuousEngine(tiny, Scheduler(), on_step=metrics.observe_step)
    jobs = [Job(base, base.encode(t), Sampling(max_new_tokens=5, ignore_eos=True), cost=20, task="metrics-probe")
            for t in ("a", "bb", "ccc")]
    engine.scheduler.submit(jobs)
    engine.start()
    try:
        _wait(jobs)
    finally:
        engine.stop()
    sample = lambda name: metrics.REGISTRY.get_sample_value(name, {"task": "metrics-probe", "kind": "base"})  # noqa: E731
    assert sample("frozenlm_time_to_first_token_seconds_count") == 3
    assert sample("frozenlm_inter_token_seconds_count") == 3 * 4  # tokens 2..5 of each row
    assert metrics.REGISTRY.get_sample_value("frozenlm_running_rows") == 0


# --- per-request answer choices (rank classification) ---------------------------------------------

def test_choices_are_scored_like_labels_in_a_mixed_batch(tiny):
    """A request's own choices, on a generation task and on a classification task (overriding its
    labels), scored in one batch with generation rows: each equals its row scored alone, and the
    scores are the softmax of the continuations' log-likelihoods."""
    import torch

    from modules.core.decode import ScoreItem, score
    from service.engine import job_labels

    base, scorer = NoModule(tiny), _prompt(tiny, 2, labels={"yes": " yes", "no": " nope"})
    tok = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    one = {"A": tok("A")[:1], "B": tok("B")[:1]}
    assert one["A"] != one["B"]
    many = {c: tok(c) for c in (" Sports", " World politics", " Science and technology")}
    makers = [lambda: Job(base, base.encode("which one?"), None, 0, labels=one),
              lambda: Job(scorer, scorer.encode("is it?"), None, 0, labels=many),
              lambda: _job(scorer, "is it?", None),
              lambda: _job(base, "hello", Sampling(max_new_tokens=6))]
    alone = [_alone(tiny, make) for make in makers]
    jobs = [make() for make in makers]
    Engine(tiny, Scheduler()).run(jobs)
    for a, j in zip(alone, jobs):
        assert _same(_outcome(j), a)
    got = _outcome(jobs[1])
    assert set(got.scores) == set(many) and got.label in many
    with torch.inference_mode():
        ll = score(tiny, [ScoreItem(jobs[1].ids, scorer.contribution(jobs[1].ids), list(many.values()))])[0]
    want = torch.softmax(ll, -1).tolist()
    assert all(abs(got.scores[c] - w) < 1e-5 for c, w in zip(many, want))
    assert job_labels(jobs[2]) == dict(zip(scorer.manifest.labels, scorer.label_ids))  # no choices: the task's labels


def test_a_prefix_cache_hit_gives_the_label_scores_of_a_miss(tiny):
    """Scoring rows (one-token and multi-token labels, several kinds) sharing a long template head:
    the first wave fills the prefix cache, the second starts from it; scores within 1e-4 of the
    same rows scored with no cache."""
    import torch

    from modules.core.prefix_cache import PrefixCache
    from modules.core.stages import prepare
    from service.engine import score_jobs
    from tests.test_running import HEAD

    mods = [m for m in _modules(tiny) if not m.probes]
    tok = lambda s: tiny.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for labels in ({"a": tok("a")[:1], "b": tok("b")[:1]}, {c: tok(c) for c in (" yes", " yet")}):
        assert len({tuple(c) for c in labels.values()}) == 2
        cache = PrefixCache(100_000)
        for wave, texts in enumerate((["one", "and two"], ["one", "three, four"])):
            jobs = [Job(m, m.encode(HEAD + t), None, 0, labels=labels) for m in mods for t in texts]
            with torch.inference_mode():
                rows = prepare(tiny, [(j.module, j.ids) for j in jobs])
                hits = cache.hits
                cached = score_jobs(tiny, list(zip(jobs, rows)), cache)
                plain = score_jobs(tiny, list(zip(jobs, rows)))
            assert cache.hits - hits == (len(jobs) if wave else 0)
            for a, b in zip(cached, plain):
                assert a.label == b.label and all(abs(a.scores[k] - b.scores[k]) < 1e-4 for k in a.scores)
            assert len({round(s.scores[s.label], 3) for s in plain}) > len(plain) // 2  # the rows really differ


def test_a_request_that_breaks_admission_fails_alone_and_the_engine_lives(tiny, engine, monkeypatch):
    """An error outside any module's own code while admitting (here: hashing one module's content
    for the prefix cache) fails only that request; the others of the same admission, and later
    ones, are answered."""
    import service.continuous as continuous

    base, bad = NoModule(tiny), _prompt(tiny, 6)
    real = continuous.content_key

    def content_key(module):
        if module is bad:
            raise RuntimeError("cannot hash")
        return real(module)

    monkeypatch.setattr(continuous, "content_key", content_key)
    makers = [lambda: _job(base, "hello", Sampling(max_new_tokens=5)), lambda: _job(bad, "x", Sampling(max_new_tokens=5)),
              lambda: _job(_prompt(tiny, 1), "zz top", Sampling(max_new_tokens=4))]
    jobs = [make() for make in makers]
    engine.scheduler.submit(jobs)
    got = _wait(jobs)
    assert got[1] is RuntimeError
    assert _same(got[0], _alone(tiny, makers[0])) and _same(got[2], _alone(tiny, makers[2]))
    later = makers[0]()
    engine.scheduler.submit([later])
    assert _same(_wait([later])[0], got[0])
