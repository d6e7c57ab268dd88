"""Hostile manifests and PEFT configs (issue 14, defects 6, 10 and 11): label caps, and each probing
kind's `probe_tokens` an upper bound of its probe rows."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from modules.base import MAX_LABEL_TOKENS, MAX_LABELS, BackboneRef, Manifest, kind_class
from modules.retrieval import Retriever
from modules.rrr import Corpus
from tests.test_documents import CORPUS


def test_label_caps(tiny):
    ref = BackboneRef.of(tiny)
    with pytest.raises(ValidationError, match="at most"):
        Manifest(kind="template", backbone=ref, labels={f"l{i}": f" w{i}" for i in range(MAX_LABELS + 1)})
    Manifest(kind="template", backbone=ref, labels={f"l{i}": f" w{i}" for i in range(MAX_LABELS)})
    with pytest.raises(ValueError, match="verbalizer is"):
        kind_class("template").new(tiny, labels={"a": " yes", "b": "x" * (MAX_LABEL_TOKENS + 1)})
    kind_class("template").new(tiny, labels={"a": " yes", "b": "x" * MAX_LABEL_TOKENS})


# --- probe_tokens: an upper bound of what a row's probes put through the backbone -----------------


def _probe_tokens(module, ids) -> int:
    probe = module.probe(ids)
    if probe is None:
        return 0
    per_row = probe.sampling.max_new_tokens if probe.sampling is not None else 0
    return sum(probe.n * (len(row) + per_row) for row in probe.rows)


@pytest.mark.parametrize("kind,config", [
    ("prompt", {}),
    ("idpt", {"encoder_prompt_tokens": 5, "encoder_layers": 1}),
    ("idpt", {"encoder_prompt_tokens": 0}),
    ("recursive", {"mode": "neural", "pass1_prompt_tokens": 3}),
    ("recursive", {"mode": "textual", "candidates": 4, "candidate_tokens": 6, "pass1_prompt_tokens": 2}),
    ("rrr", {"candidates": 4, "rerank_passage_tokens": 16}),
    ("rrr", {"candidates": 3, "rerank": False}),
])
def test_probe_tokens_bound_the_probe_rows(tiny, kind, config):
    module = kind_class(kind).new(tiny, config)
    if kind == "rrr":
        module.documents = Corpus(Retriever(tiny, progress=False).build(CORPUS), CORPUS)
    for text in ["Which zebra is extinct?", "sea otters and the capital of France on the Seine " * 3]:
        ids = module.encode(text)
        assert _probe_tokens(module, ids) <= module.probe_tokens(len(ids))
    if kind == "idpt":
        assert module.probe_tokens(len(ids)) == _probe_tokens(module, ids)  # exact: one encoder row
    if kind == "rrr" and module.config.rerank:
        assert _probe_tokens(module, ids) > 0
