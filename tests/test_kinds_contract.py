"""The contract every registered kind keeps, one table over `KINDS` (a kind missing from it fails):

- its artifact round trip gives the same config, tensors and outputs;
- its rows batched with rows of every other kind equal each row alone (generation and scoring);
- a training step moves its tensors and nothing of the backbone;
- its artifact is validated: a missing, extra or misshapen tensor is an ArtifactError.

Kind-specific references (each kind against the change written into the weights, the papers'
details) live in the kinds' own test files.
"""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import load, save

from modules.core.artifact import ArtifactError, pack, read_artifact
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.module import WEIGHTS_FILE
from modules.core.retrieval import Retriever
from modules.core.running import generate
from modules.core.stages import Context, prepare
from modules.kinds.base import NoModule
from modules.kinds.rrr import Corpus
from modules.registry import KINDS, kind_class, load_module
from modules.training.train import _Task
from tests.conftest import weights_digest
from tests.test_documents import CORPUS

Q, DOWN = "layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"
LABELS = {"no": " n", "yes": " y"}
TEXTS = ["a", "hello there, how are you doing today?", "Which zebra is extinct?", "the quick brown fox jumps",
         "0123456789" * 3, "what is made from flour"]

# kind -> its configs in the table (every registered kind must have at least one; the first is its main one)
CASES: dict[str, list[dict | None]] = {
    "prompt": [{"num_virtual_tokens": 3}, {"num_virtual_tokens": 1}, {"num_virtual_tokens": 9, "encoder": "mlp"}],
    "template": [None],
    "lora": [{"targets": ["q_proj", "v_proj", "down_proj"], "r": 4},
             {"targets": ["o_proj", "up_proj"], "r": 2, "layers": [1], "rslora": True}],
    "prefix": [{"num_virtual_tokens": 3}, {"num_virtual_tokens": 7}],
    "compose": [{"parts": [{"kind": "lora", "config": {"r": 2, "targets": ["k_proj"]}},
                           {"kind": "prompt", "config": {"num_virtual_tokens": 2}},
                           {"kind": "prefix", "config": {"num_virtual_tokens": 2}}]},
                {"parts": [{"kind": "prefix", "config": {"num_virtual_tokens": 4}},  # the MAM adapter
                           {"kind": "adapter", "config": {"style": "parallel", "bottleneck": 4, "scale": 4.0,
                                                          "targets": ["down_proj"]}}]}],
    "bitfit": [{"targets": ["q_proj", "o_proj", "up_proj"]}, {"targets": ["down_proj", "v_proj"], "layers": [1]}],
    "ia3": [{}],
    "adapter": [{"bottleneck": 8}, {"style": "parallel", "bottleneck": 4, "scale": 4.0, "activation": "gelu",
                                    "targets": ["o_proj", "down_proj", "k_proj"]}],
    "said": [{"d": 32, "targets": ["q_proj", "v_proj"]}, {"d": 32, "said": False, "layers": [0]}],
    "sparse": [{"nnz": {Q: 300, DOWN: 500}}],
    "idpt": [{"num_virtual_tokens": 3, "encoder_layers": 1},
             {"num_virtual_tokens": 2, "encoder_layers": 2, "encoder_prompt_tokens": 0}],
    "recursive": [{"pass1_prompt_tokens": 2, "pass2_prompt_tokens": 2},
                  {"feed": "replace", "connector": "transformer"},
                  {"mode": "textual", "pass1_prompt_tokens": 2, "candidates": 2, "candidate_tokens": 4}],
    "rrr": [{"candidates": 3, "context_tokens": 96, "reader_prompt_tokens": 2, "rerank_passage_tokens": 32},
            {"candidates": 2, "context_tokens": 40, "pool": "last", "reranker_depth": 2, "retrieval": "hybrid"},
            {"candidates": 2, "rerank": False, "retrieval": "dense", "reader_prompt_tokens": 1}],
    "layernorm": [{}, {"targets": ["post_attention_layernorm"], "layers": [1]}],
}
TABLE = [(kind, i) for kind in sorted(CASES) for i in range(len(CASES[kind]))]
TRAINABLE = [(kind, i) for kind, i in TABLE if kind != "template"]
IDS = lambda case: f"{case[0]}-{case[1]}"  # noqa: E731


@pytest.fixture(scope="module")
def corpus(tiny):
    return Corpus(Retriever(tiny, progress=False).build(CORPUS), CORPUS)


def _new(tiny, case: tuple[str, int], seed: int = 0):
    """The module of a table entry, with weights moved away from its (often no-op) start."""
    kind, i = case
    m = kind_class(kind).new(tiny, CASES[kind][i], labels=LABELS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _prepared(tiny, corpus, pairs):
    """Each (module, text) prepared as the server does (the request's context brings the documents),
    probes of all rows batched."""
    return prepare(tiny, [(m, m.encode(t), Context(documents=corpus)) for m, t in pairs])


def _label_scores(tiny, prepared):
    """Each row's log-likelihood of the table's labels. (rows of (2,))"""
    labels = [tiny.tokenizer(v, add_special_tokens=False)["input_ids"] for v in LABELS.values()]
    return score(tiny, [ScoreItem(p.ids, p.contribution, labels) for p in prepared])


def test_every_registered_kind_is_in_the_table():
    assert set(CASES) == set(KINDS), f"kinds missing from the contract table: {set(KINDS) - set(CASES)}"


@pytest.mark.parametrize("case", TABLE, ids=IDS)
def test_artifact_round_trip(tiny, corpus, case):
    m = _new(tiny, case)
    back = load_module(read_artifact(m.to_artifact()), tiny)
    assert back.kind == case[0] and back.manifest.labels == m.manifest.labels
    assert back.artifact_config() == m.artifact_config()
    assert back.tensors().keys() == m.tensors().keys()
    assert all(torch.equal(back.tensors()[k], v) for k, v in m.tensors().items())
    with torch.inference_mode():
        for a, b in zip(_label_scores(tiny, _prepared(tiny, corpus, [(m, t) for t in TEXTS])),
                        _label_scores(tiny, _prepared(tiny, corpus, [(back, t) for t in TEXTS]))):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def every_kind(tiny):
    return {case: _new(tiny, case, seed) for seed, case in enumerate(TABLE)}


@torch.inference_mode()
def test_rows_of_every_kind_batched_equal_each_row_alone(tiny, corpus, every_kind):
    modules = [NoModule(tiny), *every_kind.values()]
    pairs = [(modules[i % len(modules)], TEXTS[i % len(TEXTS)]) for i in range(2 * len(modules))]
    together = _prepared(tiny, corpus, pairs)
    alone = [_prepared(tiny, corpus, [pair])[0] for pair in pairs]
    assert [p.ids for p in together] == [p.ids for p in alone]

    items = lambda rows: [GenItem(p.ids, p.contribution, Sampling(max_new_tokens=6 + i % 3))  # noqa: E731
                          for i, p in enumerate(rows)]
    assert ([g.token_ids for g in generate(tiny, items(together))]
            == [generate(tiny, [it])[0].token_ids for it in items(alone)])
    for a, b in zip(_label_scores(tiny, together), [_label_scores(tiny, [p])[0] for p in alone]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("case", TRAINABLE, ids=IDS)
def test_each_kind_changes_what_the_backbone_answers(tiny, corpus, every_kind, case):
    """So that the equalities above are about modules that do something."""
    m = every_kind[case]
    text = TEXTS[2]
    base = _label_scores(tiny, _prepared(tiny, corpus, [(NoModule(tiny), text)]))[0]
    assert (_label_scores(tiny, _prepared(tiny, corpus, [(m, text)]))[0] - base).abs().max() > 1e-3


@pytest.mark.parametrize("case", TRAINABLE, ids=IDS)
def test_a_training_step_moves_the_module_and_nothing_of_the_backbone(tiny, corpus, case):
    m = _new(tiny, case, seed=7)
    m.train()
    backbone = weights_digest(tiny.model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    optim = torch.optim.Adam(m.parameters(), lr=1e-2)
    rows = [{"input": t, "label": ("yes", "no")[i % 2]} for i, t in enumerate(TEXTS)]
    _Task(m, tiny, Context(documents=corpus)).loss(rows).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    optim.step()
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert moved, "no tensor of the module moved"
    assert moved == {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert weights_digest(tiny.model) == backbone
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())


def _with_weights(m, change) -> bytes:
    """The module's artifact with its weights file changed by `change(tensors)`."""
    files = read_artifact(m.to_artifact())
    tensors = load(files[WEIGHTS_FILE])
    change(tensors)
    files[WEIGHTS_FILE] = save(tensors)
    buf = io.BytesIO(pack(files))
    return buf.getvalue()


def _misshape(tensors):
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(*tensors[name].shape[:-1], tensors[name].shape[-1] + 1,
                                dtype=tensors[name].dtype)


@pytest.mark.parametrize("change", [
    lambda t: t.pop(sorted(t)[0]),
    lambda t: t.__setitem__("extra.tensor", torch.zeros(2)),
    _misshape,
], ids=["missing", "extra", "misshapen"])
@pytest.mark.parametrize("case", TRAINABLE, ids=IDS)
def test_a_damaged_weights_file_is_refused(tiny, case, change):
    m = _new(tiny, case)
    with pytest.raises(ArtifactError):
        load_module(read_artifact(_with_weights(m, change)), tiny)
