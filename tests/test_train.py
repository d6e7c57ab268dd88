"""The trainer: only the module learns, the backbone stays bit-identical, the artifact reloads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from clients.cli import main as cli_main
from modules.core.artifact import read_artifact
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.running import generate
from modules.core.stages import prepare
from modules.registry import kind_class, load_module
from modules.training.train import TrainOptions, evaluate, lm_rows, mix, read_jsonl, train_module
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
    monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: tiny))
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
    "idpt": {"num_virtual_tokens": 4, "encoder_prompt_tokens": 2, "network_lr_scale": 0.2},
    "recursive": {"pass1_prompt_tokens": 2, "pass2_prompt_tokens": 4, "feed": "prepend"},
    "recursive-textual": {"mode": "textual", "pass2_prompt_tokens": 4, "candidates": 2, "candidate_tokens": 2},
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
    items = lambda m: [ScoreItem(p.ids, p.contribution, m.label_ids)
                       for p in prepare(tiny, [(m, m.encode(r["input"])) for r in ROWS])]
    with torch.inference_mode():
        for a, b in zip(score(tiny, items(result.module)), score(tiny, items(reloaded))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_probing_kinds_train_their_probe_side(tiny):
    """Gradients reach through the probe pass: ID-PT's encoder prompt and generator, the
    recursive connector and pass-1 prompt all move; the backbone does not."""
    before = weights_digest(tiny.model)
    opts = TrainOptions(max_steps=3, batch_size=4, lr=0.05, progress=False)
    for kind, config, names in (("idpt", KIND_CONFIGS["idpt"], ["encoder_prompt", "o.weight", "k.weight"]),
                                ("recursive", KIND_CONFIGS["recursive"], ["prompt1", "connector.up.weight"])):
        init = kind_class(kind).new(tiny, config, template="{input} ?", labels=LABELS)
        start = {k: v.clone() for k, v in init.state_dict().items()}
        result = train_module(tiny, kind, ROWS, opts, init=init, template="{input} ?", labels=LABELS)
        after = result.module.state_dict()
        for name in names:
            assert not torch.equal(start[name], after[name]), f"{kind}.{name} did not train"
    assert weights_digest(tiny.model) == before


def test_mix_draws_by_weight_and_lm_rows_cut_texts():
    a = [{"input": f"a{i}", "target": "x"} for i in range(10)]
    b = [{"input": f"b{i}", "target": "y"} for i in range(3)]
    rows = mix([(a, 3.0), (b, 1.0)], 40, seed=1)
    assert len(rows) == 40 and sum(r["source"] == 0 for r in rows) == 30
    assert {r["input"] for r in rows if r["source"] == 1} == {"b0", "b1", "b2"}  # cycles the small set
    assert mix([(a, 3.0), (b, 1.0)], 40, seed=1) == rows
    with pytest.raises(ValueError):
        mix([(a, 0.0)], 5)
    text = " ".join(f"w{i}" for i in range(30))
    (row,) = lm_rows([text, "too short"])
    assert text.startswith(row["input"] + " " + row["target"])
    assert 10 <= len(row["input"].split()) <= 20


def test_cli_trains_on_a_mixture_and_from_an_init(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: tiny))
    parts = []
    for k in range(2):
        f = tmp_path / f"part{k}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in ROWS[k::2]))
        parts.append(f"{f}:{k + 1}")
    first = tmp_path / "first.zip"
    assert cli_main(["train", "prompt", "--data", parts[0], "--data", parts[1], "--out", str(first),
                     "--max-steps", "2", "--batch-size", "3", "--labels", '{"no": " no", "yes": " yes"}']) == 0
    assert load_module(read_artifact(first.read_bytes()), tiny).manifest.metrics["train_rows"] == 6
    text = tmp_path / "lm.txt"
    text.write_text("\n".join(" ".join(f"word{i + j}" for i in range(12)) for j in range(6)))
    lm = tmp_path / "lm.zip"
    assert cli_main(["train", "recursive", "--lm-text", str(text), "--out", str(lm), "--max-steps", "2",
                     "--batch-size", "2", "--config", '{"pass2_prompt_tokens": 2}']) == 0
    task = tmp_path / "task.zip"
    assert cli_main(["train", "recursive", "--data", str(tmp_path / "part0.jsonl"), "--init", str(lm),
                     "--out", str(task), "--max-steps", "1", "--batch-size", "2",
                     "--labels", '{"no": " no", "yes": " yes"}']) == 0
    pre, post = (load_module(read_artifact(p.read_bytes()), tiny) for p in (lm, task))
    assert post.config == pre.config and post.manifest.labels


# --- Child-Tuning as a trainer option, and kind sparse by Fisher information ---------------------

CHILD_KINDS = {
    "prompt": {"num_virtual_tokens": 4},
    "lora": {"targets": ["q_proj", "v_proj", "down_proj"], "r": 4},
    "prefix": {"num_virtual_tokens": 4},
    "bitfit": {"targets": ["q_proj", "up_proj"]},
    "ia3": {},
    "adapter": {"bottleneck": 4},
    "said": {"d": 32},
    "idpt": KIND_CONFIGS["idpt"],
}


def _fresh(tiny, kind, seed=0):
    """The module train_module starts from (same seed, same init)."""
    torch.manual_seed(seed)
    m = kind_class(kind).new(tiny, CHILD_KINDS[kind], template="{input} ?", labels=LABELS)
    m.train()
    return m


@pytest.mark.parametrize("mode", ["F", "D"])
@pytest.mark.parametrize("kind", list(CHILD_KINDS))
def test_child_tuning_trains_only_the_module_and_d_only_its_child_network(tiny, kind, mode):
    from modules.training.train import _Task, child_network

    before = weights_digest(tiny.model)
    opts = TrainOptions(max_steps=6, batch_size=4, lr=0.05, progress=False, child_tuning=mode, reserve_p=0.3,
                        fisher_batches=2)
    result = train_module(tiny, kind, ROWS, opts, config=CHILD_KINDS[kind], template="{input} ?", labels=LABELS)
    assert weights_digest(tiny.model) == before
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    assert result.metrics["child_tuning"] == mode and result.metrics["reserve_p"] == 0.3
    start = _fresh(tiny, kind)
    trained = dict(result.module.named_parameters())
    moved = {n: trained[n].detach() != p.detach() for n, p in start.named_parameters()}
    assert any(m.any() for m in moved.values())
    if mode == "D":
        # the same child network the trainer chose: same init, same warm-up, batches and loss
        masks = child_network(start, _Task(start, tiny), ROWS, opts)
        assert result.metrics["child_params"] == sum(int(m.sum()) for m in masks.values())
        for n, m in masks.items():  # each tensor keeps its own share
            assert int(m.sum()) == max(1, round(0.3 * m.numel())), n
        for n, m in moved.items():
            assert not (m & ~masks[n]).any(), f"{kind}.{n}: an entry outside the Fisher mask moved"
    # the artifact reloads and answers as the trained module does
    reloaded = load_module(read_artifact(result.artifact), tiny)
    assert reloaded.manifest.metrics["child_tuning"] == mode


@pytest.mark.parametrize("kind", ["lora", "adapter", "idpt", "said"])
def test_child_network_estimates_fisher_after_an_undone_warmup_and_keeps_p_of_every_tensor(tiny, kind, monkeypatch):
    """At the initial state, tensors upstream of a zero-initialised output (LoRA's A, an adapter's
    down-projection, ID-PT's generator and encoder prompt, SAID's lambda) have zero gradient. After
    the warm-up every tensor has Fisher information, every tensor keeps about p of its entries,
    and the module is back at its initial state."""
    import modules.training.child_tuning
    from modules.training.train import _Task, child_network

    seen, fishers = [], []  # the parameters the Fisher estimate saw, and the estimate
    real = modules.training.child_tuning.fisher_information

    def spy(params, *args, **kwargs):
        seen.append({n: p.detach().clone() for n, p in params.items()})
        fishers.append(real(params, *args, **kwargs))
        return fishers[-1]

    monkeypatch.setattr(modules.training.child_tuning, "fisher_information", spy)
    # lr 0.01: at 0.05 this trivial task is solved within the warm-up and a ReLU bottleneck can die
    opts = TrainOptions(batch_size=4, lr=0.01, progress=False, child_tuning="D", reserve_p=0.3, fisher_batches=2)
    module = _fresh(tiny, kind)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    masks = child_network(module, _Task(module, tiny), ROWS, opts)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(masks) == names and set(fishers[0]) == names
    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), initial[n]) and p.grad is None, f"{kind}.{n}: the warm-up was not undone"
        assert not torch.equal(seen[0][n], initial[n]), f"{kind}.{n}: the Fisher estimate saw no warm-up"
        assert fishers[0][n].any(), f"{kind}.{n}: zero Fisher information after the warm-up"
        assert int(masks[n].sum()) == max(1, round(0.3 * p.numel())), n

    # without a warm-up the estimate is made at the initial state: some tensor has no Fisher at all
    fishers.clear()
    child_network(module, _Task(module, tiny), ROWS, dataclasses.replace(opts, fisher_warmup_steps=0))
    assert any(not f.any() for f in fishers[0].values())


def test_child_tuning_d_trains_loras_a_in_every_layer(tiny):
    """The issue's measurement: with the mask chosen at the initial state (B = 0), A never moved.
    Now A and B move in every layer, only inside the mask, from the initial state."""
    from modules.training.train import _Task, child_network

    before = weights_digest(tiny.model)
    opts = TrainOptions(max_steps=3, batch_size=4, lr=0.01, progress=False, child_tuning="D", reserve_p=0.3,
                        fisher_batches=2)
    result = train_module(tiny, "lora", ROWS, opts, config=CHILD_KINDS["lora"], template="{input} ?", labels=LABELS)
    assert weights_digest(tiny.model) == before
    start = _fresh(tiny, "lora")
    masks = child_network(start, _Task(start, tiny), ROWS, opts)
    trained = dict(result.module.named_parameters())
    layers = [n for n, _ in start.named_parameters() if n.startswith("A.")]
    assert len(layers) == 2 * 3  # 2 decoder layers x q, v, down
    for n, p in start.named_parameters():
        moved = trained[n].detach() != p.detach()
        assert moved.any(), f"{n} did not train"
        assert not (moved & ~masks[n]).any(), f"{n}: an entry outside the mask moved"
    assert result.metrics["fisher_warmup_steps"] == 10


def test_child_tuning_f_masks_a_fresh_random_subset_each_step(tiny):
    """One step of mode F moves about reserve_p of a prompt's entries (AdamW would move all)."""
    for mode, lo, hi in (("F", 0.15, 0.45), (None, 0.99, 1.0)):
        opts = TrainOptions(max_steps=1, batch_size=4, lr=0.05, progress=False, child_tuning=mode, reserve_p=0.3)
        result = train_module(tiny, "prompt", ROWS, opts, config=CHILD_KINDS["prompt"], template="{input} ?",
                              labels=LABELS)
        frac = (result.module.embeddings != _fresh(tiny, "prompt").embeddings).float().mean().item()
        assert lo <= frac <= hi, (mode, frac)


def test_child_tuning_d_learns_the_task(tiny):
    opts = TrainOptions(max_steps=30, batch_size=4, lr=0.1, progress=False, child_tuning="D", reserve_p=0.5)
    result = train_module(tiny, "prompt", ROWS, opts, eval_rows=ROWS, config={"num_virtual_tokens": 4},
                          template="{input} ?", labels=LABELS)
    assert sum(result.history[-5:]) < 0.5 * sum(result.history[:5])
    assert result.metrics["eval_accuracy"] == 1.0


def test_child_tuning_options_are_checked():
    with pytest.raises(ValueError, match="child_tuning"):
        TrainOptions(child_tuning="E")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        TrainOptions(child_tuning="F", reserve_p=0.0)
    with pytest.raises(ValueError, match="fisher_batches"):
        TrainOptions(child_tuning="D", fisher_batches=0)
    with pytest.raises(ValueError, match="fisher_warmup_steps"):
        TrainOptions(child_tuning="D", fisher_warmup_steps=-1)


def test_sparse_trains_the_backbones_top_fisher_weights_without_touching_them(tiny):
    from modules.core.targets import slot
    from modules.training.child_tuning import backbone_fisher_masks
    from modules.training.train import _Task, fisher_batches

    before = weights_digest(tiny.model)
    opts = TrainOptions(max_steps=12, batch_size=4, lr=0.02, progress=False, fisher_batches=2)
    config = {"targets": ["q_proj", "down_proj"], "reserve_p": 0.05}
    result = train_module(tiny, "sparse", ROWS, opts, eval_rows=ROWS, config=config, template="{input} ?",
                          labels=LABELS)
    assert weights_digest(tiny.model) == before                      # bit-identical backbone
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    assert sum(result.history[-4:]) < sum(result.history[:4])
    m = result.module
    keys = [k for k in tiny.linear_keys if k.endswith(("q_proj", "down_proj"))]
    candidates = sum(tiny.linear_keys[k][0] * tiny.linear_keys[k][1] for k in keys)
    assert sum(m.config.nnz.values()) == round(0.05 * candidates) == result.metrics["fisher"]["selected"]
    assert result.metrics["trainable_params"] == sum(m.config.nnz.values())

    # the positions are the top 5% by Fisher information (the same estimate, made independently)
    probe = kind_class("template").new(tiny, template="{input} ?", labels=LABELS)
    masks = backbone_fisher_masks(tiny, keys, fisher_batches(ROWS, opts), _Task(probe, tiny).loss, 0.05,
                                  progress=False)
    assert weights_digest(tiny.model) == before
    assert all(not p.requires_grad and p.grad is None for p in tiny.model.parameters())
    base = tiny.model.base_model
    for key in keys:
        mask = masks[key]
        if not mask.any():
            assert key not in m.config.nnz
            continue
        assert torch.equal(m.indices.get_buffer(slot(key)), mask.flatten().nonzero().squeeze(1))
        w = base.get_submodule(key).weight
        effective = w + m.delta_weight(key).detach()
        differs = effective != w
        assert differs.any() and not (differs & ~mask).any()       # only masked positions differ

    reloaded = load_module(read_artifact(result.artifact), tiny)
    assert reloaded.kind == "sparse" and reloaded.config.nnz == m.config.nnz
    assert evaluate(reloaded, tiny, ROWS)["eval_accuracy"] == result.metrics["eval_accuracy"]


def test_cli_train_child_tuning_and_sparse(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: tiny))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    before = weights_digest(tiny.model)
    common = ["--data", str(data), "--max-steps", "2", "--batch-size", "4", "--labels", '{"no": " no", "yes": " yes"}']
    out = tmp_path / "lora-d.zip"
    assert cli_main(["train", "lora", *common, "--out", str(out), "--child-tuning", "D", "--reserve-p", "0.2",
                     "--fisher-batches", "1", "--fisher-warmup-steps", "2", "--lr", "0.01"]) == 0
    metrics = load_module(read_artifact(out.read_bytes()), tiny).manifest.metrics
    assert metrics["child_tuning"] == "D" and metrics["reserve_p"] == 0.2 and metrics["fisher_batches"] == 1
    assert metrics["fisher_warmup_steps"] == 2
    out = tmp_path / "prompt-f.zip"
    assert cli_main(["train", "prompt", *common, "--out", str(out), "--child-tuning", "F"]) == 0
    assert load_module(read_artifact(out.read_bytes()), tiny).manifest.metrics["child_tuning"] == "F"
    out = tmp_path / "sparse.zip"
    assert cli_main(["train", "sparse", *common, "--out", str(out), "--lr", "0.01",
                     "--config", '{"targets": ["v_proj"], "reserve_p": 0.1}']) == 0
    module = load_module(read_artifact(out.read_bytes()), tiny)
    assert module.kind == "sparse" and set(module.config.nnz) <= {k for k in tiny.linear_keys if k.endswith("v_proj")}
    assert module.manifest.metrics["fisher"]["reserve_p"] == 0.1
    assert weights_digest(tiny.model) == before
