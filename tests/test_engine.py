"""The engine on a tiny random model: one row's failure stays with that row's request, and
sampling is numerically safe for every temperature the API accepts."""

from __future__ import annotations

import math

import pytest
import torch

from modules.core.batch import Contribution
from modules.core.decode import GenItem, RowError, Sampling, _pick
from modules.core.running import generate
from modules.kinds.base import NoModule
from modules.registry import kind_class
from service.engine import Engine, Scored
from service.scheduler import Job, Scheduler

TEXTS = ["a", "hello there", "the quick brown fox", "zz top"]


def _prompt(tiny, seed: int, labels=None):
    m = kind_class("prompt").new(tiny, {"num_virtual_tokens": 3, "seed": seed}, template="Q: {input}\nA:",
                                 labels=labels)
    with torch.no_grad():
        m.embeddings.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return m


def _job(module, text: str, sampling: Sampling | None) -> Job:
    return Job(module, module.encode(text), sampling, cost=0)


def _outcome(job: Job):
    """What the request would get: its result, or the type of its exception."""
    e = job.future.exception()
    return type(e) if e is not None else job.future.result()


def _same(a, b) -> bool:
    if isinstance(a, Scored):
        return a.label == b.label and all(math.isclose(a.scores[k], b.scores[k], abs_tol=1e-5) for k in a.scores)
    return a == b


def _healthy(tiny):
    greedy = lambda: Sampling(max_new_tokens=6)  # noqa: E731
    seeded = lambda: Sampling(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=7)  # noqa: E731
    base, p1, scorer = NoModule(tiny), _prompt(tiny, 1), _prompt(tiny, 2, labels={"yes": " yes", "no": " nope"})
    return [lambda: _job(base, TEXTS[0], greedy()), lambda: _job(p1, TEXTS[1], seeded()),
            lambda: _job(scorer, TEXTS[2], None), lambda: _job(base, TEXTS[3], Sampling(max_new_tokens=6,
                                                                                        temperature=1e-300))]


def _broken(tiny, how: str):
    """A prompt module whose contribution fails in one of three ways."""
    m = _prompt(tiny, 9)
    if how == "raises":        # the module's own code fails while its row is prepared
        def contribution(ids):
            raise RuntimeError("injected fault")
        m.contribution = contribution
    elif how == "nan":         # its row's logits are NaN: found at the first decode step
        with torch.no_grad():
            m.embeddings.fill_(float("nan"))
    elif how == "bad_shape":   # its row cannot be put in a pass with the others: the whole pass fails
        m.contribution = lambda ids: Contribution(prepend=torch.zeros(2, tiny.hidden_size + 1))
    return m


@pytest.mark.parametrize("how", ["raises", "nan", "bad_shape"])
def test_a_failing_row_fails_only_its_own_request(tiny, how):
    engine = Engine(tiny, Scheduler())
    makers = _healthy(tiny)
    alone = []
    for make in makers:
        job = make()
        engine.run([job])
        alone.append(_outcome(job))
    assert all(not isinstance(a, type) for a in alone), alone
    bad = _broken(tiny, how)
    jobs = [make() for make in makers[:2]] + [_job(bad, "boom", Sampling(max_new_tokens=6))] + \
        [make() for make in makers[2:]]
    streamed = []
    jobs[1].on_text = lambda piece, tokens, index: streamed.append(piece)
    engine.run(jobs)
    outcomes = [_outcome(j) for j in jobs]
    assert outcomes[2] in (RuntimeError, RowError)
    for got, want in zip(outcomes[:2] + outcomes[3:], alone):
        assert _same(got, want), (got, want)
    assert "".join(streamed) == outcomes[1].text  # streamed once, even when its batch was rerun


def test_nan_label_scores_fail_only_that_row(tiny):
    engine = Engine(tiny, Scheduler())
    good, bad = _prompt(tiny, 3, labels={"a": " a", "b": " b"}), _prompt(tiny, 4, labels={"a": " a", "b": " b"})
    with torch.no_grad():
        bad.embeddings.fill_(float("nan"))
    jobs = [_job(good, "x", None), _job(bad, "x", None)]
    engine.run(jobs)
    assert isinstance(jobs[0].future.result(), Scored)
    assert isinstance(jobs[1].future.exception(), RowError)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30, 1e-6])
def test_a_tiny_temperature_is_greedy_not_nan(tiny, temperature):
    """softmax(logits / 1e-300) used to overflow to NaN and fail the batch; it is greedy in the limit."""
    ids = NoModule(tiny).encode("hello there")
    greedy, cold = generate(tiny, [GenItem(ids, Contribution(), Sampling(max_new_tokens=8)),
                                   GenItem(ids, Contribution(), Sampling(max_new_tokens=8, temperature=temperature,
                                                                         top_p=0.5, top_k=40, seed=1))])
    assert cold.error is None and cold.token_ids == greedy.token_ids


def test_pick_is_finite_for_extreme_temperatures():
    logits = torch.tensor([3.0, 1.0, 2.9, -50.0])
    gen = torch.Generator().manual_seed(0)
    assert _pick(logits, Sampling(temperature=1e-300), gen) == 0
    hot = [_pick(logits, Sampling(temperature=10.0), gen) for _ in range(400)]
    assert set(hot) == {0, 1, 2, 3}  # close to uniform: every token shows up


def test_a_tiny_temperature_over_http_fails_nobody(tiny_served, tmp_path):
    """The reported attack: temperature 1e-300 on /infer and /v1/completions, sent together with
    ordinary requests to a real server: every request answers 200, the ordinary ones as alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.adversary import assert_ready, served

    folder, _ = tiny_served
    plain = [{"inputs": t, "parameters": {"max_new_tokens": 6}} for t in TEXTS]
    cold = {"inputs": "hi", "parameters": {"temperature": 1e-300, "max_new_tokens": 3}}
    openai_cold = {"model": "base", "prompt": "hi", "temperature": 1e-300, "max_tokens": 3}
    with served({"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false"}, tmp_path / "store") as srv:
        def post(path_body):
            return httpx.post(srv.url + path_body[0], json=path_body[1], timeout=120)

        alone = [post(("/tasks/base/infer", b)).json()["outputs"][0]["text"] for b in plain]
        calls = [("/tasks/base/infer", cold), ("/v1/completions", openai_cold)] + \
            [("/tasks/base/infer", b) for b in plain]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(post, calls * 3))
        assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers if r.status_code != 200]
        for k in range(3):
            got = [r.json()["outputs"][0]["text"] for r in answers[k * len(calls) + 2:(k + 1) * len(calls)]]
            assert got == alone
        assert_ready(srv.url)


def _tokens_through_backbone(tiny, monkeypatch) -> list[int]:
    """Every pass's real (unpadded) tokens, recorded as the engine runs."""
    seen, real = [], tiny.forward

    def forward(embeds, mask, *args, **kw):
        seen.append(int(mask.sum()))
        return real(embeds, mask, *args, **kw)

    monkeypatch.setattr(tiny, "forward", forward)
    return seen


def test_a_jobs_cost_is_what_the_engine_puts_through_the_backbone(tiny, monkeypatch):
    from service.config import Settings
    from service.runtime import Runtime
    from service.schemas import InferParameters

    rt = Runtime(Settings(examples=False, _env_file=None), tiny)
    one = _prompt(tiny, 3, labels={"yes": "y", "no": "n"})
    many = _prompt(tiny, 4, labels={"a": " the fox", "b": " jumps over", "c": " the lazy"})  # tiny tokens: ~1 per character
    assert all(len(c) == 1 for c in one.label_ids) and any(len(c) > 1 for c in many.label_ids)
    jobs = [j for m in (one, many) for j in rt._jobs("t", m, ["some text here"], InferParameters())]
    seen = _tokens_through_backbone(tiny, monkeypatch)
    Engine(tiny, Scheduler()).run(jobs)  # both in one batch
    assert all(isinstance(_outcome(j), Scored) for j in jobs)
    assert sum(seen) == sum(j.cost for j in jobs)
    length = many.pass_length(len(jobs[1].ids))
    assert jobs[1].cost == sum(length + len(c) for c in many.label_ids)  # one row per label


def test_a_modules_probe_tokens_are_charged(tiny, monkeypatch):
    from service.config import Settings
    from service.runtime import Runtime
    from service.schemas import InferParameters

    rt = Runtime(Settings(examples=False, _env_file=None), tiny)
    m = _prompt(tiny, 5)
    [plain] = rt._jobs("t", m, ["hi"], InferParameters(max_new_tokens=4))
    monkeypatch.setattr(m, "probe_tokens", lambda n: 10 * n)
    [probed] = rt._jobs("t", m, ["hi"], InferParameters(max_new_tokens=4))
    assert probed.cost == plain.cost + 10 * len(plain.ids)
