"""The trainer: only the module learns, the backbone stays bit-identical, the artifact reloads."""

from __future__ import annotations

import json

import pytest
import torch

from clients.cli import main as cli_main
from modules.artifact import read_artifact
from modules.base import load_module
from modules.decode import GenItem, Sampling, ScoreItem, generate, score
from modules.train import TrainOptions, evaluate, read_jsonl, train_module
from tests.conftest import weights_digest

# The tiny random model has no skill to unlock, so the task is one a prompt alone can learn: always
# answer "yes" (the untrained model answers "no" to several inputs).
ROWS = [{"input": t, "label": "yes"} for t in ["cat 1", "dog", "bird 7", "fish", "4 cows", "sheep", "9 rats", "owl"]]
LABELS = {"no": "n", "yes": "y"}  # one byte token each in the tiny tokenizer


def test_training_learns_and_leaves_the_backbone_bit_identical(tiny):
    untrained = train_module(tiny, "prompt", ROWS, TrainOptions(max_steps=0, progress=False), eval_rows=ROWS,
                             config={"num_virtual_tokens": 4}, template="{input} ?", labels=LABELS)
    assert untrained.metrics["eval_accuracy"] < 0.8
    before = weights_digest(tiny.model)
    opts = TrainOptions(max_steps=30, batch_size=4, lr=0.1, progress=False)
    result = train_module(tiny, "prompt", ROWS, opts, eval_rows=ROWS, config={"num_virtual_tokens": 4},
                          template="{input} ?", labels=LABELS)
    assert weights_digest(tiny.model) == before
    assert all(not p.requires_grad for p in tiny.model.parameters())
    h = result.history
    assert sum(h[-5:]) / 5 < 0.2 * sum(h[:5]) / 5  # the loss really went down
    assert result.metrics["eval_accuracy"] == 1.0
    assert not torch.equal(result.module.embeddings, untrained.module.embeddings)

    reloaded = load_module(read_artifact(result.artifact), tiny)
    assert reloaded.manifest.metrics["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert evaluate(reloaded, tiny, ROWS)["eval_accuracy"] == 1.0


def test_default_labels_come_from_the_data(tiny):
    rows = ROWS + [{"input": "zebra", "label": "no"}]
    result = train_module(tiny, "prompt", rows, TrainOptions(max_steps=1, progress=False),
                          config={"num_virtual_tokens": 2})
    assert result.module.manifest.labels == {"no": " no", "yes": " yes"}


def test_generation_targets_lower_the_loss_and_exact_match_is_measured(tiny):
    rows = [{"input": w, "target": "x"} for w in ["ab", "cd", "ef", "gh"]]
    result = train_module(tiny, "prompt", rows, TrainOptions(max_steps=20, batch_size=4, lr=0.1, progress=False),
                          eval_rows=rows, config={"num_virtual_tokens": 6})
    assert sum(result.history[-3:]) < sum(result.history[:3])
    # exact match: the module's own greedy outputs (cut by a stop string) score 1.0, other strings 0.0
    module = result.module
    ids = module.encode(rows[0]["input"])
    free = generate(tiny, [GenItem(ids, module.contribution(ids), Sampling(max_new_tokens=12))])[0].text
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    module.manifest = module.manifest.model_copy(
        update={"generation": module.manifest.generation.model_copy(update={"stop": [free[cut]]})})
    own = [{"input": rows[0]["input"], "target": free[:cut]}]
    assert free[:cut].strip() and evaluate(module, tiny, own)["eval_exact_match"] == 1.0
    wrong = [{"input": rows[0]["input"], "target": free[:cut] + "\u2603"}]
    assert evaluate(module, tiny, wrong)["eval_exact_match"] == 0.0


def test_read_jsonl_rejects_rows_without_input_or_answer(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"input": "x"}) + "\n")
    try:
        read_jsonl(p)
    except ValueError as e:
        assert "bad.jsonl:1" in str(e)
    else:
        raise AssertionError("accepted a row with no target or label")


def test_cli_train_writes_an_artifact(tmp_path, tiny, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "m.zip"
    monkeypatch.setattr("modules.backbone.Backbone.load", classmethod(lambda cls, *a, **k: tiny))
    rc = cli_main(["train", "prompt", "--data", str(data), "--eval", str(data), "--out", str(out),
                   "--max-steps", "3", "--batch-size", "4", "--labels", '{"no": " no", "yes": " yes"}', "--template", "{input} ?"])
    assert rc == 0
    module = load_module(read_artifact(out.read_bytes()), tiny)
    assert module.manifest.metrics["train_steps"] == 3 and "eval_accuracy" in module.manifest.metrics
    assert module.manifest.template == "{input} ?"


KIND_CONFIGS = {
    "prompt": {"num_virtual_tokens": 4},
    "lora": {"targets": ["q_proj", "v_proj", "down_proj"], "r": 4},
    "prefix": {"num_virtual_tokens": 4},
    "prefix-reparam": {"num_virtual_tokens": 4, "reparam_hidden": 32},
    "compose": {"parts": [{"kind": "lora", "config": {"r": 2}}, {"kind": "prompt", "config": {"num_virtual_tokens": 2}}]},
}


@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_every_kind_trains_only_its_own_parameters(tiny, name):
    kind = name.split("-")[0]
    before = weights_digest(tiny.model)
    result = train_module(tiny, kind, ROWS, TrainOptions(max_steps=25, batch_size=4, lr=0.05, progress=False),
                          eval_rows=ROWS, config=KIND_CONFIGS[name], template="{input} ?", labels=LABELS)
    assert weights_digest(tiny.model) == before
    assert sum(result.history[-5:]) < 0.5 * sum(result.history[:5])
    assert result.metrics["eval_accuracy"] == 1.0
    # the artifact (folded, for prefix-reparam) answers exactly as the trained module does
    reloaded = load_module(read_artifact(result.artifact), tiny)
    assert reloaded.kind == kind
    if name == "prefix-reparam":
        assert reloaded.config.reparam_hidden is None and not hasattr(reloaded, "mlp")
    items = lambda m: [ScoreItem(m.encode(r["input"]), m.contribution(m.encode(r["input"])), m.label_ids)
                       for r in ROWS]
    with torch.inference_mode():
        for a, b in zip(score(tiny, items(result.module)), score(tiny, items(reloaded))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
