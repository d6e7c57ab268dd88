"""Helpers shared by the bench scripts: answer normalisation and scores (SQuAD's), and the added
latency of one request through a module."""

from __future__ import annotations

import os
import platform
import re
import statistics
import string
import time
from collections import Counter

import torch

from modules.core.decode import ScoreItem, score
from modules.core.stages import prepare

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(a) for a in answers))


def f1(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 against any gold answer (SQuAD's: an empty side scores 1 only
    against another empty side)."""
    best = 0.0
    pred = normalize(prediction).split()
    for a in answers:
        gold = normalize(a).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


@torch.inference_mode()
def latency_ms(backbone, module, texts: list[str], repeats: int = 3) -> float:
    """Median time of one single-row request (its probes, then a scoring pass), in ms."""
    times = []
    for _ in range(repeats):
        for t in texts:
            start = time.perf_counter()
            row = prepare(backbone, [(module, module.encode(t))])[0]
            score(backbone, [ScoreItem(row.ids, row.contribution, [[0]])])
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def machine(backbone=None) -> str:
    """The machine a result was measured on, as the README tables name it (without a backbone in
    this process, e.g. a bench that talks to a server: the machine and its cores)."""
    if backbone is None:
        return f"{platform.machine()}, {os.cpu_count()} cores, served backbone"
    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, {backbone.device}, "
            f"{str(backbone.dtype).removeprefix('torch.')}")
