"""Full fine-tuning (modules/training/full.py): the reference the module kinds are compared against."""

from __future__ import annotations

import pytest
import torch

from modules.core.decode import ScoreItem, score
from modules.core.stages import prepare
from modules.registry import kind_class
from modules.training.full import checkpoint_bytes, copy_backbone, train_full
from modules.training.train import TrainOptions, evaluate, train_module
from tests.conftest import weights_digest

ROWS = [{"input": t, "label": "yes" if i % 2 else "no"} for i, t in enumerate(["cat 1", "dog", "bird 7", "fish"])]
FIELDS = {"template": "{input} ?", "labels": {"no": "n", "yes": "y"}}


def _label_lls(bb, module, texts):
    with torch.inference_mode():
        rows = prepare(bb, [(module, module.encode(t)) for t in texts])
        return torch.stack(score(bb, [ScoreItem(r.ids, r.contribution, module.label_ids) for r in rows]))


def test_train_full_moves_every_weight_of_a_copy_and_leaves_the_backbone_bit_identical(tiny):
    before = weights_digest(tiny.model)
    original = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    result = train_full(tiny, ROWS, TrainOptions(max_steps=4, batch_size=4, lr=1e-2, progress=False),
                        eval_rows=ROWS, **FIELDS)
    assert weights_digest(tiny.model) == before
    assert all(not p.requires_grad for p in tiny.model.parameters())
    tuned = result.backbone.model.state_dict()
    moved = [k for k, v in original.items() if not torch.equal(v, tuned[k])]
    assert moved == list(original)  # every tensor of the copy was trained (embeddings, norms, all linears)
    assert result.backbone.model is not tiny.model and all(not p.requires_grad for p in result.backbone.model.parameters())
    m = result.metrics
    assert m["trainable_params"] == sum(p.numel() for p in tiny.model.parameters())
    assert m["train_steps"] == 4 and 0.0 <= m["eval_accuracy"] <= 1.0 and m["eval_rows"] == 4
    assert result.history[-1] < result.history[0]  # it learned the four rows
    # the tuned model scores differently from the frozen one; the frozen one is unchanged
    template = kind_class("template").new(tiny, **FIELDS)
    frozen = _label_lls(tiny, template, ["dog", "fish"])
    assert not torch.allclose(_label_lls(result.backbone, result.module, ["dog", "fish"]), frozen)
    torch.testing.assert_close(_label_lls(tiny, template, ["dog", "fish"]), frozen, atol=0, rtol=0)


def test_train_full_uses_train_modules_data_order_and_loss(tiny):
    """At lr 0 full fine-tuning changes nothing, so its per-step losses are train_module's for a
    module that adds nothing (a bitfit module is zero at start; at lr 0 it stays zero)."""
    opts = TrainOptions(max_steps=3, batch_size=2, lr=0.0, seed=5, progress=False)
    full = train_full(tiny, ROWS, opts, **FIELDS)
    ref = train_module(tiny, "bitfit", ROWS, opts, **FIELDS)
    assert full.history == pytest.approx(ref.history, abs=1e-5)
    assert evaluate(full.module, full.backbone, ROWS) == evaluate(ref.module, tiny, ROWS)


def test_copy_backbone_serves_rows_like_the_original_and_modules_on_it_do_not_touch_the_original(tiny):
    copy = copy_backbone(tiny)
    lora = kind_class("lora").new(tiny, {"targets": ["q_proj"], "r": 2}, **FIELDS)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.1)
    torch.testing.assert_close(_label_lls(copy, lora, ["dog"]), _label_lls(tiny, lora, ["dog"]), atol=1e-6, rtol=0)
    # the original's delta hooks are not on the copy: a pass on the copy runs each hook once
    calls = []
    handle = copy.model.base_model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        _label_lls(copy, lora, ["dog"])
    finally:
        handle.remove()
    assert len(calls) == 1 and len(copy.model.base_model.layers[0].self_attn.q_proj._forward_hooks) == 1


def test_checkpoint_bytes_is_the_size_of_the_float32_safetensors_file(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)
    assert checkpoint_bytes(tiny) == (tmp_path / "model.safetensors").stat().st_size


def test_train_full_refuses_child_tuning(tiny):
    with pytest.raises(ValueError, match="child_tuning"):
        train_full(tiny, ROWS, TrainOptions(max_steps=1, child_tuning="F", progress=False), **FIELDS)
