"""Black-Box Tuning: CMA-ES over z, prompt = p0 + A z, scored in-process or through the HTTP API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modules.core.artifact import read_artifact
from modules.core.decode import ScoreItem, score
from modules.registry import kind_class, load_module
from modules.training.blackbox import (
    BlackBoxOptions,
    blackbox_tune,
    blackbox_tune_http,
    cma_search,
    projection_std,
    random_projection,
)
from tests.conftest import weights_digest

# Separable by the input word; one byte token per label in the tiny tokenizer.
ROWS = [{"input": f"{w} {w}", "label": lab} for w, lab in [("good", "y"), ("nice", "y"), ("great", "y"), ("fine", "y"),
                                                          ("bad", "n"), ("awful", "n"), ("poor", "n"), ("ugly", "n")]]
LABELS = {"n": "n", "y": "y"}
SMALL = dict(intrinsic_dim=32, popsize=8, progress=False, seed=0)


def _label_lls(module, backbone, rows):
    """Each row's label log-likelihoods (N, K), computed independently of modules.training.blackbox."""
    items = [ScoreItem(module.encode(r["input"]), module.contribution(module.encode(r["input"])), module.label_ids)
             for r in rows]
    with torch.inference_mode():
        return torch.stack(score(backbone, items))


def _ce(module, backbone, rows):
    names = list(module.manifest.labels)
    gold = torch.tensor([names.index(r["label"]) for r in rows])
    return float(torch.nn.functional.cross_entropy(_label_lls(module, backbone, rows), gold))


def test_in_process_bbt_lowers_the_training_loss(tiny):
    before = weights_digest(tiny.model)
    opts = BlackBoxOptions(generations=4, **SMALL)
    result = blackbox_tune(tiny, ROWS, opts, eval_rows=ROWS, config={"num_virtual_tokens": 4},
                           template="{input} ?", labels=LABELS)
    m = result.metrics
    assert m["train_loss"] < m["initial_loss"]
    assert m["generations"] == 4 and m["evaluations"] == 1 + 4 * 8 and len(result.history) == 4
    assert min(result.history) == pytest.approx(m["train_loss"], abs=1e-4)
    assert "eval_accuracy" in m and weights_digest(tiny.model) == before  # forward passes only

    # the artifact is a prompt module whose loss is the one the search reported
    module = load_module(read_artifact(result.artifact), tiny)
    assert module.kind == "prompt" and tuple(module.embeddings.shape) == (4, tiny.hidden_size)
    assert module.manifest.metrics["train_loss"] == m["train_loss"]
    assert _ce(module, tiny, ROWS) == pytest.approx(m["train_loss"], abs=1e-3)
    initial = kind_class("prompt").new(tiny, {"num_virtual_tokens": 4}, template="{input} ?", labels=LABELS)
    assert _ce(initial, tiny, ROWS) == pytest.approx(m["initial_loss"], abs=1e-3)  # z = 0 is p0 alone

    again = blackbox_tune(tiny, ROWS, BlackBoxOptions(generations=2, **SMALL), config={"num_virtual_tokens": 4},
                          template="{input} ?", labels=LABELS)
    assert again.history == result.history[:2]  # seeded: same projection, same samples


def test_cma_search_minimises_a_quadratic_through_the_projection():
    d, P, H = 10, 2, 8
    A = random_projection(P * H, d, std=1.0, seed=1)                               # (P*H, d)
    p0 = torch.randn(P, H, generator=torch.Generator().manual_seed(2))
    z_star = np.linspace(-1, 1, d)
    target = p0 + (A @ torch.as_tensor(z_star, dtype=torch.float32)).view(P, H)

    def objective(prompts):
        return [(float(((p - target) ** 2).mean()), 0.0) for p in prompts]

    found = cma_search(objective, p0, A, BlackBoxOptions(intrinsic_dim=d, popsize=10, generations=60, progress=False))
    assert found.loss < 1e-3 * found.initial_loss
    assert np.abs(found.z - z_star).max() < 0.05


def test_the_projection_is_scaled_as_in_the_reference():
    opts = BlackBoxOptions(intrinsic_dim=400, sigma=0.5, alpha=2.0)
    std = projection_std(0.03, opts)
    assert std == pytest.approx(2.0 * 0.03 / (math.sqrt(400) * 0.5))
    A = random_projection(1000, 400, std, seed=0)
    assert A.std().item() == pytest.approx(std, rel=0.01)
    assert torch.equal(A, random_projection(1000, 400, std, seed=0))


def test_options_and_rows_are_checked(tiny):
    with pytest.raises(ValueError):
        BlackBoxOptions(popsize=1)
    with pytest.raises(ValueError):
        BlackBoxOptions(loss="mse")
    with pytest.raises(ValueError, match="generations must be an integer"):
        BlackBoxOptions(generations=3.0)
    with pytest.raises(ValueError, match="classification rows"):
        blackbox_tune(tiny, [{"input": "a", "target": "b"}], BlackBoxOptions(generations=0, **SMALL),
                      labels=LABELS)
    with pytest.raises(ValueError, match="not one of the labels"):
        blackbox_tune(tiny, [{"input": "a", "label": "maybe"}], BlackBoxOptions(generations=0, **SMALL),
                      config={"num_virtual_tokens": 2}, labels=LABELS)


def test_bbt_over_http_against_a_real_server(tiny_served, tmp_path):
    from clients import Client, NotFound
    from tests.server import running_server

    folder, bb = tiny_served
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path / "store"),
           "FROZENLM_EXAMPLES": "false"}
    opts = BlackBoxOptions(intrinsic_dim=16, popsize=4, generations=2, progress=False, seed=0)
    fields = dict(config={"num_virtual_tokens": 4}, template="{input} ?", labels=LABELS)
    with running_server(env) as url, Client(url) as c:
        result = blackbox_tune_http(c, ROWS, opts, eval_rows=ROWS[:3], backbone=bb, scratch_task="bbt-scratch",
                                    **fields)
        with pytest.raises(NotFound):
            c.get_task("bbt-scratch")
        assert c.list_tasks() == []
        m = result.metrics
        assert m["evaluations"] == 1 + 2 * 4 and m["train_loss"] <= m["initial_loss"] and m["eval_rows"] == 3
        module = load_module(read_artifact(result.artifact), bb)
        assert module.kind == "prompt" and tuple(module.embeddings.shape) == (4, bb.hidden_size)
        # the service's probabilities give the loss the in-process scorer gives
        assert _ce(module, bb, ROWS) == pytest.approx(m["train_loss"], abs=1e-3)
        local = blackbox_tune(bb, ROWS, BlackBoxOptions(generations=0, **SMALL), **fields)
        assert m["initial_loss"] == pytest.approx(local.metrics["initial_loss"], abs=1e-3)
        up = c.upload("bbt-result", result.artifact)  # an artifact the service takes as it is
        assert up.kind == "prompt"
        served = [o.label for o in c.infer("bbt-result", [r["input"] for r in ROWS]).outputs]
        assert served == [list(LABELS)[i] for i in _label_lls(module, bb, ROWS).argmax(-1).tolist()]

        # pure language-model-as-a-service: no local backbone, p0 = 0, std_hat given
        lmaas = blackbox_tune_http(c, ROWS, BlackBoxOptions(intrinsic_dim=8, popsize=2, generations=1, progress=False),
                                   embedding_std=0.02, config={"num_virtual_tokens": 2}, template="{input} ?",
                                   labels=LABELS)
        again = load_module(read_artifact(lmaas.artifact), bb)
        assert again.manifest.backbone.fingerprint == bb.info.fingerprint
        assert [t.name for t in c.list_tasks()] == ["bbt-result"]  # its own scratch task is gone too

        # an existing task is never used as the scratch task
        with pytest.raises(ValueError, match="already exists"):
            blackbox_tune_http(c, ROWS, opts, backbone=bb, scratch_task="bbt-result", **fields)
        assert c.get_task("bbt-result").version == 1
        with pytest.raises(ValueError, match="embedding_std"):
            blackbox_tune_http(c, ROWS, opts, **fields)


def test_cli_blackbox_in_process_writes_a_prompt_module(tmp_path, tiny, monkeypatch):
    import json

    from clients.cli import main as cli_main

    monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: tiny))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "bbt.zip"
    before = weights_digest(tiny.model)
    rc = cli_main(["blackbox", "--data", str(data), "--eval", str(data), "--out", str(out), "--labels", json.dumps(LABELS),
                   "--template", "{input} ?", "--num-virtual-tokens", "4", "--intrinsic-dim", "32", "--popsize", "8",
                   "--generations", "3"])
    assert rc == 0 and weights_digest(tiny.model) == before
    module = load_module(read_artifact(out.read_bytes()), tiny)
    m = module.manifest.metrics
    assert module.kind == "prompt" and tuple(module.embeddings.shape) == (4, tiny.hidden_size)
    assert module.manifest.template == "{input} ?" and module.manifest.labels == LABELS
    assert m["evaluations"] == 1 + 3 * 8 and m["intrinsic_dim"] == 32 and "eval_accuracy" in m
    assert m["train_loss"] <= m["initial_loss"]
    # the same search as the library call
    again = blackbox_tune(tiny, ROWS, BlackBoxOptions(intrinsic_dim=32, popsize=8, generations=3, progress=False),
                          config={"num_virtual_tokens": 4}, template="{input} ?", labels=LABELS)
    assert again.metrics["train_loss"] == m["train_loss"]


def test_cli_blackbox_over_http(tiny_served, tmp_path, monkeypatch):
    import json

    from clients import Client
    from clients.cli import main as cli_main
    from tests.server import running_server

    folder, bb = tiny_served
    monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: bb))
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_STORE_DIR": str(tmp_path / "store"),
           "FROZENLM_EXAMPLES": "false"}
    common = ["--data", str(data), "--labels", json.dumps(LABELS), "--template", "{input} ?",
              "--num-virtual-tokens", "4", "--intrinsic-dim", "16", "--popsize", "4", "--generations", "2"]
    with running_server(env) as url:
        local = tmp_path / "local-p0.zip"   # p0 and std_hat from the local copy of the served backbone
        assert cli_main(["blackbox", *common, "--url", url, "--out", str(local), "--eval", str(data),
                         "--eval-limit", "3"]) == 0
        lmaas = tmp_path / "lmaas.zip"      # no local backbone: p0 = 0, the embedding std given
        monkeypatch.setattr("modules.core.backbone.Backbone.load", classmethod(lambda cls, *a, **k: 1 / 0))
        assert cli_main(["blackbox", *common, "--url", url, "--embedding-std", "0.02", "--out", str(lmaas)]) == 0
        with Client(url) as c:
            assert c.list_tasks() == []      # the scratch tasks are gone
    for path in (local, lmaas):
        module = load_module(read_artifact(path.read_bytes()), bb)
        m = module.manifest.metrics
        assert module.kind == "prompt" and m["evaluations"] == 1 + 2 * 4 and m["train_loss"] <= m["initial_loss"]
    assert load_module(read_artifact(local.read_bytes()), bb).manifest.metrics["eval_rows"] == 3
    assert _ce(load_module(read_artifact(local.read_bytes()), bb), bb, ROWS) == pytest.approx(
        load_module(read_artifact(local.read_bytes()), bb).manifest.metrics["train_loss"], abs=1e-3)
