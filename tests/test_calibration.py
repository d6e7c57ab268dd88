"""Label scoring options: length normalization and contextual calibration, on the tiny model,
through the trainer's evaluation and through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from modules.core.artifact import read_artifact
from modules.core.calibration import CONTENT_FREE, label_probs, prior
from modules.core.decode import ScoreItem, score
from modules.core.module import LabelScoring
from modules.registry import kind_class, load_module
from modules.training.train import evaluate
from service.engine import Engine
from service.scheduler import Job, Scheduler

LABELS = {"no": " nope", "yes": " yes, surely", "maybe": " m"}  # 5, 12 and 2 tokens on the tiny tokenizer


def _module(tiny, **scoring):
    """The same soft prompt with the given scoring options, loaded from its artifact."""
    m = kind_class("prompt").new(tiny, {"num_virtual_tokens": 3, "seed": 4}, template="Q: {input}\nA:", labels=LABELS,
                                 scoring=LabelScoring(**scoring))
    with torch.no_grad():
        m.embeddings.normal_(0, 1, generator=torch.Generator().manual_seed(4))
    return load_module(read_artifact(m.to_artifact()), tiny)


def _lls(tiny, m, texts):
    with torch.inference_mode():
        return score(tiny, [ScoreItem(m.encode(t), m.contribution(m.encode(t)), m.label_ids) for t in texts])


def test_length_normalization_scores_the_mean_token_log_likelihood(tiny):
    m = _module(tiny, length_normalize=True)
    lengths = torch.tensor([len(c) for c in m.label_ids], dtype=torch.float64)
    assert len(set(lengths.tolist())) == 3
    lls = _lls(tiny, m, ["a", "bb b"])
    for ll, p in zip(lls, label_probs(tiny, m, lls)):
        torch.testing.assert_close(p, torch.softmax(ll.double() / lengths, -1))


def test_contextual_calibration_divides_by_the_content_free_prior(tiny):
    m = _module(tiny, calibrate=True)
    p_cf = torch.stack([torch.softmax(ll.double(), -1) for ll in _lls(tiny, m, list(CONTENT_FREE))]).mean(0)
    torch.testing.assert_close(prior(tiny, m), p_cf)
    lls = _lls(tiny, m, ["a", "bb b", "the quick fox"])
    for ll, p in zip(lls, label_probs(tiny, m, lls)):
        raw = torch.softmax(ll.double(), -1)
        torch.testing.assert_close(p, (raw / p_cf) / (raw / p_cf).sum())
    assert prior(tiny, m) is prior(tiny, m)  # once per loaded module


def test_the_engine_and_the_trainer_use_the_tasks_scoring(tiny):
    """The same calibrated module answers through the engine with the calibrated probabilities,
    and evaluate() counts accuracy with them; an uncalibrated copy differs somewhere."""
    texts = ["a", "bb b", "the quick fox", "zz", "0123", "hello there", "ok ok", "xyz"]
    plain, calibrated = _module(tiny), _module(tiny, calibrate=True, length_normalize=True)
    jobs = [Job(calibrated, calibrated.encode(t), None, 0) for t in texts]
    Engine(tiny, Scheduler()).run(jobs)
    want = label_probs(tiny, calibrated, _lls(tiny, calibrated, texts))
    names = list(LABELS)
    for j, p in zip(jobs, want):
        got = j.future.result()
        assert got.label == names[int(p.argmax())]
        assert all(abs(got.scores[n] - float(p[i])) < 1e-6 for i, n in enumerate(names))
    raw = [names[int(ll.argmax())] for ll in _lls(tiny, plain, texts)]
    assert raw != [j.future.result().label for j in jobs]  # the options change answers on this model
    rows = [{"input": t, "label": names[int(p.argmax())]} for t, p in zip(texts, want)]
    assert evaluate(calibrated, tiny, rows)["eval_accuracy"] == 1.0
    assert evaluate(plain, tiny, rows)["eval_accuracy"] < 1.0


def test_scoring_options_travel_in_the_manifest_and_are_strict(tiny):
    m = _module(tiny, calibrate=True)
    manifest = json.loads(read_artifact(m.to_artifact())["module.json"])
    assert manifest["scoring"] == {"calibrate": True, "length_normalize": False}
    files = read_artifact(m.to_artifact())
    manifest["scoring"]["temperature"] = 2
    files["module.json"] = json.dumps(manifest).encode()
    with pytest.raises(Exception, match="temperature"):
        load_module(files, tiny)
