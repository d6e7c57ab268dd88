"""The kinds bitfit, ia3, adapter, said, sparse and layernorm: no-op at start, exact against a reference model
with the change written into its weights (or hooks), the trainer on each, and the recipes from the
literature. What every kind must do (round trip, batching, training moves only the module, artifact
validation) is the table in tests/test_kinds_contract.py."""

from __future__ import annotations

import json

import pytest
import torch

from modules.core.artifact import ArtifactError, read_artifact
from modules.core.batch import Contribution, Row, build_pass
from modules.core.decode import GenItem, Sampling
from modules.core.running import generate
from modules.kinds.base import NoModule
from modules.registry import kind_class, load_module
from tests.conftest import tiny_backbone, weights_digest

TEXTS = ["a", "hello there, how are you doing today?", "xyz xyz", "the quick brown fox jumps", "0123456789" * 3,
         "zz top", "mixed batches of many tasks", "ok"]
Q, DOWN = "layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"

CONFIGS = {
    "bitfit": ("bitfit", {"targets": ["q_proj", "o_proj", "up_proj"]}),
    "bitfit-layer1": ("bitfit", {"targets": ["down_proj", "v_proj"], "layers": [1]}),
    "ia3": ("ia3", {}),
    "adapter-houlsby": ("adapter", {"bottleneck": 8}),
    "adapter-parallel": ("adapter", {"style": "parallel", "bottleneck": 4, "scale": 4.0, "activation": "gelu",
                                     "targets": ["o_proj", "down_proj", "k_proj"]}),
    "said": ("said", {"d": 64, "targets": ["q_proj", "v_proj", "down_proj"], "seed": 3}),
    "said-did": ("said", {"d": 32, "said": False, "layers": [0]}),
    "sparse": ("sparse", {"nnz": {Q: 300, DOWN: 500}}),
    "layernorm": ("layernorm", {}),
    "layernorm-layer1": ("layernorm", {"targets": ["post_attention_layernorm"], "layers": [1]}),
}


def _new(tiny, name):
    kind, cfg = CONFIGS[name]
    return kind_class(kind).new(tiny, cfg)


def _randomize(m, seed: int):
    """Weights far from the no-op start, so every module changes outputs a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if m.kind == "ia3":
                p.copy_(1 + 0.5 * noise)
            elif m.kind == "said":
                p.copy_(noise * (1.0 if n == "theta" else 0.3) + (1.0 if n == "lam" else 0.0))
            else:
                p.copy_(noise * 0.3)
    return m


def _mask(tiny, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in (Q, "layers.1.mlp.gate_proj"):
        fan_in, fan_out = tiny.linear_keys[key]
        out[key] = torch.rand(fan_out, fan_in, generator=g) < 0.2
    return out


def _hidden(tiny, module, text: str, contribution=None) -> torch.Tensor:
    """Last-layer hidden states of one row alone (with another contribution if given). (T, H)"""
    ids = module.encode(text)
    p = build_pass(tiny, [Row(ids, module.contribution(ids) if contribution is None else contribution)])
    return tiny.forward(p.embeds, p.mask, p.positions, p.cache, p.deltas)[0]


@pytest.mark.parametrize("name", [*CONFIGS, "sparse-mask"])
def test_starts_as_an_exact_no_op(tiny, name):
    m = kind_class("sparse").from_mask(tiny, _mask(tiny, 0)) if name == "sparse-mask" else _new(tiny, name)
    with torch.inference_mode():
        for text in TEXTS[:3]:
            assert torch.equal(_hidden(tiny, m, text), _hidden(tiny, m, text, contribution=Contribution()))


# --- exact against a reference: the same change written into a private copy of the model ---------


def _reference_logits(edit, ids: list[int]) -> torch.Tensor:
    """Logits of a fresh copy of the tiny model after `edit(model)`: the plain HF forward."""
    ref = tiny_backbone().model
    with torch.no_grad():
        edit(ref)
        return ref(input_ids=torch.tensor([ids])).logits[0]


def _linear(model, key):
    return model.model.get_submodule(key)


def _module_logits(tiny, m, ids):
    p = build_pass(tiny, [Row(ids, m.contribution(ids))])
    with torch.inference_mode():
        return tiny.logits(tiny.forward(p.embeds, p.mask, p.positions, p.cache, p.deltas)[0])


def _edit(m):
    """The module's change written into a model's weights (or, for adapters, its blocks' hooks)."""
    def edit(model):
        if m.kind == "bitfit":
            for key in m.delta.keys:
                _linear(model, key).bias = torch.nn.Parameter(m.bias[key.replace(".", "__")].detach().clone())
        elif m.kind == "ia3":
            for key in m.delta.keys:
                l = m.l[key.replace(".", "__")].detach()
                w = _linear(model, key).weight
                w.mul_(l[None, :] if key.endswith("down_proj") else l[:, None])
        elif m.kind in ("said", "sparse"):
            for key in m.delta.keys:
                _linear(model, key).weight.add_(m.delta_weight(key).detach())
        elif m.kind == "adapter":
            _adapter_hooks(model, m)
        elif m.kind == "layernorm":
            for key in m.delta.keys:
                model.model.get_submodule(key).weight.add_(m.scale[key.replace(".", "__")].detach())
    return edit


def _adapter_hooks(model, m):
    """Adapters as their papers write them, on whole blocks: serial on the block's output,
    parallel from the block's input (the normed hidden state entering attention / the MLP)."""
    cfg = m.config
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}[cfg.activation]

    def f(key, h):
        s = key.replace(".", "__")
        return cfg.scale * (act(h @ m.down[s].T + m.down_bias[s]) @ m.up[s].T + m.up_bias[s])

    for key in m.delta.keys & {k.replace("__", ".") for k in m.down}:
        block_path, name = key.rsplit(".", 1)
        if name in ("o_proj", "down_proj"):
            block = model.model.get_submodule(block_path)

            def hook(_mod, args, kwargs, out, key=key):
                y = out[0] if isinstance(out, tuple) else out
                x = args[0] if args else kwargs["hidden_states"]
                y = y + f(key, y if cfg.style == "houlsby" else x)
                return (y, *out[1:]) if isinstance(out, tuple) else y

            block.register_forward_hook(hook, with_kwargs=True)
        else:  # any other target: around the layer itself
            def hook(_mod, args, out, key=key):
                return out + f(key, out if cfg.style == "houlsby" else args[0])

            _linear(model, key).register_forward_hook(hook)


@pytest.mark.parametrize("name", [*CONFIGS, "sparse-mask"])
def test_equals_the_change_written_into_the_weights(tiny, name):
    m = kind_class("sparse").from_mask(tiny, _mask(tiny, 1)) if name == "sparse-mask" else _new(tiny, name)
    _randomize(m, 7)
    for text in TEXTS[1:3]:
        ids = m.encode(text)
        got = _module_logits(tiny, m, ids)
        with torch.no_grad():
            want = _reference_logits(_edit(m), ids)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        base = _reference_logits(lambda _: None, ids)
        assert (got - base).abs().max() > 0.05  # the module really changes the outputs


# --- artifacts --------------------------------------------------------------------------------


def test_a_config_that_selects_no_layer_is_an_artifact_error(tiny):
    m = _new(tiny, "bitfit")
    files = read_artifact(m.to_artifact())
    manifest = json.loads(files["module.json"])
    manifest["config"]["layers"] = [99]
    files["module.json"] = json.dumps(manifest).encode()
    with pytest.raises(ArtifactError, match="select no linear layer"):
        load_module(files, tiny)


def test_ia3_feedforward_must_be_a_target():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be among targets"):
        kind_class("ia3").Config(targets=["k_proj"], feedforward=["down_proj"])


# --- batching -----------------------------------------------------------------------------------


def _batch_modules(tiny):
    mods = [NoModule(tiny)]
    lora = kind_class("lora").new(tiny, {"targets": ["q_proj", "v_proj", "down_proj"], "r": 4})
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mods.append(lora)
    for i, name in enumerate(CONFIGS):
        mods.append(_randomize(_new(tiny, name), 100 + i))
    mods.append(_randomize(kind_class("sparse").from_mask(tiny, _mask(tiny, 3)), 200))
    return mods


# --- training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_trainer_trains_each_kind(tiny, name):
    from modules.training.train import TrainOptions, train_module

    rows = [{"input": t, "label": "yes"} for t in ["cat 1", "dog", "bird 7", "fish"]]
    before = weights_digest(tiny.model)
    kind, cfg = CONFIGS[name]
    result = train_module(tiny, kind, rows, TrainOptions(max_steps=4, batch_size=4, lr=0.05, progress=False),
                          config=cfg, template="{input} ?", labels={"no": "n", "yes": "y"})
    assert weights_digest(tiny.model) == before
    assert result.history[-1] < result.history[0]
    again = load_module(read_artifact(result.artifact), tiny)
    with torch.inference_mode():
        torch.testing.assert_close(_hidden(tiny, again, "dog"), _hidden(tiny, result.module, "dog"), atol=1e-6, rtol=0)


# --- said -----------------------------------------------------------------------------------------


def test_said_artifact_holds_only_theta_and_the_layer_scales(tiny):
    m = _new(tiny, "said")
    n_layers = len(m.delta.keys)
    assert n_layers == 2 * 3
    assert {k: tuple(v.shape) for k, v in m.tensors().items()} == {"said.theta": (64,), "said.lam": (n_layers,)}
    did = _new(tiny, "said-did")
    assert sum(t.numel() for t in did.tensors().values()) == 32
    files = read_artifact(did.to_artifact())
    assert len(files["weights.safetensors"]) < 1024
    assert json.loads(files["module.json"])["config"]["seed"] == 0


def test_said_same_seed_same_projection(tiny):
    a, b = kind_class("said").new(tiny, {"d": 50, "seed": 9}), kind_class("said").new(tiny, {"d": 50, "seed": 9})
    c = kind_class("said").new(tiny, {"d": 50, "seed": 10})
    theta = torch.randn(50)
    for m in (a, b, c):
        with torch.no_grad():
            m.theta.copy_(theta)
    for key in a.delta.keys:
        assert torch.equal(a.delta_weight(key), b.delta_weight(key))
        assert not torch.allclose(a.delta_weight(key), c.delta_weight(key))
    ka, kb = sorted(a.delta.keys)[:2]
    assert not torch.allclose(a.delta_weight(ka).flatten()[:100], a.delta_weight(kb).flatten()[:100])


def test_said_fastfood_equals_the_explicit_matrix():
    from modules.kinds.said import fastfood, fastfood_vars, fwht

    L, D, d = 64, 40, 7
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < L:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])          # Sylvester
    v = torch.randn(3, L, dtype=torch.float64)
    torch.testing.assert_close(fwht(v), v @ H.T)
    b, perm, g = fastfood_vars(D, d, seed=123)
    assert b.shape == perm.shape == g.shape == (L,)
    Pi = torch.eye(L, dtype=torch.float64)[perm.long()]                      # (Pi v)_k = v[perm[k]]
    P = (H @ torch.diag(g.double()) @ Pi @ H @ torch.diag(b.double()))[:D, :d] / (D * g.double().square().sum()).sqrt()
    theta = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(fastfood(theta, D, b, perm, g), P @ theta)
    # near-isometric columns, and the map is differentiable in theta
    big = torch.stack([fastfood(e, 4096, *fastfood_vars(4096, 16, seed=1)) for e in torch.eye(16)])
    assert ((big.norm(dim=1) - 1).abs() < 0.1).all()
    t = torch.randn(16, requires_grad=True)
    fastfood(t, 4096, *fastfood_vars(4096, 16, seed=1)).square().sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0


def test_dense_deltas_are_built_once_for_a_loaded_module(tiny):
    m = load_module(read_artifact(_randomize(_new(tiny, "said"), 1).to_artifact()), tiny)
    calls = []
    build = m.dense.build
    m.dense.build = lambda key: calls.append(key) or build(key)
    with torch.inference_mode():
        first = _hidden(tiny, m, TEXTS[1])
        generate(tiny, [GenItem(m.encode("x"), m.contribution(m.encode("x")), Sampling(max_new_tokens=5))])
    assert sorted(calls) == sorted(m.delta.keys)                              # once per layer, not per step
    with torch.no_grad():
        m.theta.mul_(2)                                                       # a changed parameter rebuilds
        assert not torch.equal(_hidden(tiny, m, TEXTS[1]), first)
    assert len(calls) == 2 * len(m.delta.keys)
    assert m.nbytes > sum(t.numel() * 4 for t in m.tensors().values())     # the dense deltas are counted


# --- sparse ---------------------------------------------------------------------------------------


def test_sparse_from_mask_updates_exactly_the_masked_weights(tiny):
    masks = _mask(tiny, 5)
    m = kind_class("sparse").from_mask(tiny, {**masks, "layers.1.mlp.up_proj": torch.zeros(128, 64, dtype=torch.bool)})
    assert set(m.delta.keys) == set(masks)                                   # empty masks are left out
    assert m.config.nnz == {k: int(v.sum()) for k, v in masks.items()}
    _randomize(m, 3)
    for key, mask in masks.items():
        dw = m.delta_weight(key)
        assert torch.equal(dw != 0, mask)
    t = m.tensors()
    assert t[f"sparse.indices.{Q}"].dtype == torch.int64 and t[f"sparse.values.{Q}"].dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        kind_class("sparse").from_mask(tiny, {Q: torch.ones(3, 3, dtype=torch.bool)})


@pytest.mark.parametrize("corrupt,needle", [
    (lambda t: t.float(), "expected int64 indices"),
    (lambda t: t.flip(0), "strictly increasing"),
    (lambda t: torch.cat([t[:1], t[:-1]]), "strictly increasing"),
    (lambda t: t + 64 * 64, "outside"),
    (lambda t: t[:-1], "shape"),
])
def test_sparse_bad_indices_are_refused(tiny, corrupt, needle):
    from safetensors.torch import save

    m = kind_class("sparse").from_mask(tiny, _mask(tiny, 6))
    files = read_artifact(m.to_artifact())
    tensors = m.tensors()
    tensors[f"sparse.indices.{Q}"] = corrupt(tensors[f"sparse.indices.{Q}"]).contiguous()
    files["weights.safetensors"] = save(tensors)
    with pytest.raises(ArtifactError, match=needle):
        load_module(files, tiny)


# --- recipes from the literature, as composed modules and templates --------------------------------

MAM = {"parts": [{"kind": "prefix", "config": {"num_virtual_tokens": 4}},
                 {"kind": "adapter", "config": {"style": "parallel", "targets": ["down_proj"], "bottleneck": 4,
                                                "scale": 4.0}}]}


@pytest.mark.parametrize("kind,config,template", [("compose", MAM, "{input} ?"),  # the MAM adapter
                                                  ("bitfit", {}, "{input}")])      # a null prompt with BitFit
def test_recipes_train_only_their_module_and_serve_in_a_mixed_batch(tiny, kind, config, template):
    """MAM (prefix on attention + a parallel adapter on the FFN scaled by 4) and a null prompt
    (the input and the label, nothing else) with BitFit: training moves every module tensor and
    leaves the backbone bit-identical; the trained module's rows batched with other kinds' equal
    each row alone."""
    from modules.training.train import TrainOptions, train_module

    rows = [{"input": t, "label": "yes" if i % 2 else "no"} for i, t in enumerate(["cat 1", "dog", "bird 7", "fish"])]
    before = weights_digest(tiny.model)
    fresh = kind_class(kind).new(tiny, config, template=template, labels={"no": "n", "yes": "y"})
    result = train_module(tiny, kind, rows, TrainOptions(max_steps=4, batch_size=4, lr=0.05, progress=False),
                          config=config, template=template, labels={"no": "n", "yes": "y"})
    assert weights_digest(tiny.model) == before
    moved = {k for k, v in result.module.tensors().items() if not torch.equal(v, fresh.tensors()[k])}
    zero_at_start = {k for k, v in fresh.tensors().items() if not v.any()}  # moved by training only
    assert zero_at_start and zero_at_start <= moved
    assert kind != "compose" or {k.split(".")[0] for k in moved} >= {"prefix", "adapter"}
    assert kind != "bitfit" or len(moved) == len(fresh.tensors())
    mods = [result.module] + _batch_modules(tiny)[:5]
    items = [GenItem(m.encode(t), m.contribution(m.encode(t)), Sampling(max_new_tokens=6))
             for m, t in zip(mods * 2, TEXTS)]
    assert [g.token_ids for g in generate(tiny, items)] == [generate(tiny, [it])[0].token_ids for it in items]


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_trains_an_encoder_and_folds_it_into_a_plain_prompt(tiny, encoder):
    """P-tuning (v1): a new module is exactly its plain initial prompt; training moves the encoder
    and the backbone stays bit-identical; the artifact is a plain `prompt` whose outputs equal the
    trained module's, and serves in a mixed batch like any other row; an artifact that still names
    an encoder is refused."""
    from modules.training.train import TrainOptions, train_module

    config = {"num_virtual_tokens": 4, "encoder": encoder, "encoder_hidden": 16}
    fresh = kind_class("prompt").new(tiny, config, template="{input} ?", labels={"no": "n", "yes": "y"})
    assert torch.equal(fresh.prompt(), fresh.embeddings)
    rows = [{"input": t, "label": "yes" if i % 2 else "no"} for i, t in enumerate(["cat 1", "dog", "bird 7", "fish"])]
    before = weights_digest(tiny.model)
    result = train_module(tiny, "prompt", rows, TrainOptions(max_steps=4, batch_size=4, lr=0.05, progress=False),
                          config=config, template="{input} ?", labels={"no": "n", "yes": "y"})
    assert weights_digest(tiny.model) == before
    assert result.module.encoder.mlp[2].weight.abs().sum() > 0  # the encoder learned
    files = read_artifact(result.artifact)
    manifest = json.loads(files["module.json"])
    assert manifest["config"]["encoder"] is None and list(load_module(files, tiny).tensors()) == ["prompt.embeddings"]
    served = load_module(files, tiny)
    with torch.inference_mode():
        torch.testing.assert_close(_hidden(tiny, served, "dog"), _hidden(tiny, result.module, "dog"), atol=1e-5, rtol=0)
    mods = [served] + _batch_modules(tiny)[:4]
    items = [GenItem(m.encode(t), m.contribution(m.encode(t)), Sampling(max_new_tokens=6)) for m, t in zip(mods * 2, TEXTS)]
    assert [g.token_ids for g in generate(tiny, items)] == [generate(tiny, [it])[0].token_ids for it in items]
    manifest["config"]["encoder"] = encoder
    files["module.json"] = json.dumps(manifest).encode()
    with pytest.raises(ArtifactError, match="encoder must be null"):
        load_module(files, tiny)
