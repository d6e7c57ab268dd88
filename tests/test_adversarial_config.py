"""Hostile manifests and PEFT configs (issue 14, defects 6, 10 and 11): every size field bounded,
declared tensor shapes checked before anything is built, construction errors as 422, uploaded
regular expressions time-bounded, NaN/Infinity refused, PEFT ranks checked against their config,
label caps, and each probing kind's `probe_tokens` an upper bound of its probe rows.

The attacks run against one real server on the tiny model: each gets 422, `/readyz` stays 200, the
store is byte-for-byte unchanged and the server's peak memory grows by less than 100 MB."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save

from modules.core.artifact import ArtifactError, pack, read_artifact
from modules.core.module import MAX_LABEL_TOKENS, MAX_LABELS, BackboneRef, Manifest, loads, weight_shapes
from modules.core.retrieval import Retriever
from modules.core.stages import Context
from modules.core.targets import pattern_values
from modules.kinds.rrr import Corpus
from modules.peft import load_peft
from modules.registry import kind_class, load_module
from tests.adversary import assert_ready, peak_growth_mb, served, store_digest
from tests.test_documents import CORPUS

ADMIN = {"Authorization": "Bearer config-admin"}
# would backtrack through a layer name for far longer than a second
BACKTRACKING = "(?:.{0,3}){0,40}(?<=0)"
FUZZY = "(?:(?:.*)*zzzzzzzzzzzzzzzzzzzz){e<=10}"  # `regex`'s fuzzy matching: its memory grows while it runs


def _artifact(bb, kind: str, config: dict, tensors: dict | None = None, edit=lambda text: text,
              **manifest) -> bytes:
    """A module zip written by hand: module.json as given (json.dumps writes NaN and Infinity as
    such; `edit` may change its text), weights of a module of the kind made with the config's
    valid part (`targets`) unless `tensors` says otherwise."""
    if tensors is None:
        tensors = kind_class(kind).new(bb, {k: v for k, v in config.items() if k == "targets"}).tensors()
    doc = {"format": "frozenlm.module/1", "kind": kind, "backbone": BackboneRef.of(bb).model_dump(),
           "config": config, **manifest}
    return pack({"module.json": edit(json.dumps(doc)).encode(), "weights.safetensors": save(tensors)})


def _peft(bb, config: dict, rank=lambda key: 4) -> bytes:
    """A PEFT LoRA folder on q_proj of every layer, A (rank, in) and B (out, rank)."""
    tensors = {}
    for key, (fan_in, fan_out) in bb.linear_keys.items():
        if key.endswith("q_proj"):
            name = f"base_model.model.model.{key}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank(key), fan_in)
            tensors[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank(key))
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **config}
    return pack({"adapter_config.json": json.dumps(cfg).encode(), "adapter_model.safetensors": save(tensors)})


def _lora(**config):
    return lambda bb: _artifact(bb, "lora", {"targets": ["q_proj"], **config})


def _kind(kind: str, config: dict, **kw):
    return lambda bb: _artifact(bb, kind, config, **kw)


ATTACKS = {
    # sizes past their bounds, or within them but disagreeing with the tensors: nothing allocated
    "rank_pattern 400000": _lora(rank_pattern={"layers.0.self_attn.q_proj": 400000}),
    "idpt attention_dim 200000": _kind("idpt", {"attention_dim": 200000}),
    "recursive connector_dim 4096": _kind("recursive", {"connector": "transformer", "connector_dim": 4096}),
    "recursive connector_dim 2048, default tensors": _kind("recursive", {"connector": "transformer",
                                                                         "connector_dim": 2048}),
    "prefix reparam_hidden 4096": _kind("prefix", {"reparam_hidden": 4096}),
    # construction errors, each once a 500
    "rank_pattern -1": _lora(rank_pattern={"q_proj": -1}),
    "rank_pattern 0": _lora(rank_pattern={"q_proj": 0}),
    "rank_pattern bad regex": _lora(rank_pattern={"((": 4}),
    "rank_pattern not a dict": _lora(rank_pattern=["q_proj", 4]),
    "unknown LoRA target": _kind("lora", {"targets": ["q_proj", "qq_proj"]}, tensors={}),
    "idpt encoder_layers 999": _kind("idpt", {"encoder_layers": 999}),
    "idpt encoder_layers past the backbone": _kind("idpt", {"encoder_layers": 200}),
    "idpt heads do not divide attention_dim": _kind("idpt", {"attention_dim": 100, "heads": 3}),
    "compose with an rrr part": _kind("compose", {"parts": [{"kind": "prompt"}, {"kind": "rrr"}]}, tensors={}),
    # an uploaded regular expression that backtracks
    "rank_pattern backtracking": _lora(rank_pattern={BACKTRACKING: 4}),
    "rank_pattern fuzzy": _lora(rank_pattern={FUZZY: 4}),
    # NaN and Infinity (1e999 overflows to Infinity in json.loads)
    "alpha Infinity": _lora(alpha=float("inf")),
    "alpha 1e999": _kind("lora", {"targets": ["q_proj"], "alpha": 1.25}, edit=lambda t: t.replace("1.25", "1e999")),
    "adapter scale NaN": _kind("adapter", {"scale": float("nan")}),
    "temperature Infinity": _kind("prompt", {}, generation={"temperature": float("inf")}),
    # labels
    "too many labels": _kind("template", {}, labels={f"l{i}": f" w{i}" for i in range(MAX_LABELS + 1)}),
    "a label too long": _kind("template", {}, labels={"a": " yes", "b": "x" * (MAX_LABEL_TOKENS + 1)}),
    # PEFT
    "PEFT rank 4 under r 8": lambda bb: _peft(bb, {}),
    "PEFT lora_alpha NaN": lambda bb: _peft(bb, {"r": 4, "lora_alpha": float("nan")}),
    "PEFT rank_pattern backtracking": lambda bb: _peft(bb, {"r": 4, "rank_pattern": {BACKTRACKING: 4}}),
}


@pytest.fixture(scope="module")
def server(tiny_served, tmp_path_factory):
    folder, bb = tiny_served
    store = tmp_path_factory.mktemp("config-store")
    env = {"FROZENLM_BACKBONE": str(folder), "FROZENLM_EXAMPLES": "false", "FROZENLM_DEVICE": "cpu",
           "FROZENLM_ADMIN_KEY": "config-admin"}
    with served(env, store) as srv:
        ok = httpx.put(srv.url + "/tasks/kept", content=_artifact(bb, "prompt", {}), headers=ADMIN, timeout=60)
        assert ok.status_code == 201, ok.text
        yield srv, bb


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_upload_is_refused_cheaply(server, name):
    srv, bb = server
    data = ATTACKS[name](bb)
    before = store_digest(srv.store)
    box = {}
    growth = peak_growth_mb(srv.pid, lambda: box.setdefault(
        "r", httpx.put(srv.url + "/tasks/hostile", content=data, headers=ADMIN, timeout=120)))
    r = box["r"]
    assert r.status_code == 422, r.text
    assert store_digest(srv.store) == before
    assert growth < 100, f"{name}: peak memory grew by {growth:.0f} MB"
    assert_ready(srv.url)


def test_refusals_say_why(server):
    srv, bb = server

    def message(name: str) -> str:
        return httpx.put(srv.url + "/tasks/hostile", content=ATTACKS[name](bb), headers=ADMIN,
                         timeout=120).json()["error"]["message"]

    assert "lora_A.weight has shape (4, 64)" in message("PEFT rank 4 under r 8")
    assert "(8, 64)" in message("PEFT rank 4 under r 8")
    assert "more than" in message("rank_pattern backtracking")
    assert "probes the input" in message("compose with an rrr part")
    assert "Infinity" in message("temperature Infinity")
    assert "expected" in message("recursive connector_dim 2048, default tensors")


# --- unit tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999", '{"a": [1, {"b": -1e400}]}'])
def test_artifact_json_refuses_nan_and_infinity(text):
    with pytest.raises(ValueError):
        loads(text)


def test_artifact_json_reads_finite_numbers():
    assert loads('{"a": 1.5, "b": [2, -3e10]}') == {"a": 1.5, "b": [2, -3e10]}


def test_weight_shapes_come_from_the_header_alone():
    data = save({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.int64)})
    assert weight_shapes(data) == {"a": (3, 4), "b": (5,)}
    for broken in (data[:4], b"\xff" * 8 + data[8:], data[:8] + b"[]" + data[10:]):
        with pytest.raises(ArtifactError):
            weight_shapes(broken)


def test_layer_patterns_match_the_end_of_a_name():
    keys = ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]
    got = pattern_values({r"layers\.1\.self_attn\.q_proj": 2, "up_proj": 3, r"\w*proj": 9}, keys, 8)
    assert got == {"layers.0.self_attn.q_proj": 9, "layers.1.self_attn.q_proj": 2, "layers.1.mlp.up_proj": 3}
    assert pattern_values({"_proj": 1}, keys, 8) == dict.fromkeys(keys, 8)  # after a dot, not any suffix


def test_a_backtracking_pattern_is_an_artifact_error_not_a_stall():
    with pytest.raises(ArtifactError, match="more than"):
        pattern_values({BACKTRACKING: 4}, ["layers.0.self_attn.q_proj"] * 50, 8)
    for bad in ("((", FUZZY, "q{99999999999999999999}", "x" * 257):
        with pytest.raises(ArtifactError, match="layer pattern"):
            pattern_values({bad: 4}, ["layers.0.self_attn.q_proj"], 8)
    assert pattern_values({r"layers\.\d{1,2}\.self_attn\.q_proj": 4}, ["layers.10.self_attn.q_proj"], 8) == \
        {"layers.10.self_attn.q_proj": 4}


def test_checking_a_config_allocates_nothing(tiny):
    """A connector of 2048 (33M parameters, 134 MB) in a manifest whose tensors do not match: the
    check refuses it from the shapes, having built the module on the meta device only."""
    data = ATTACKS["recursive connector_dim 2048, default tensors"](tiny)
    box = {}

    def load():
        try:
            load_module(read_artifact(data), tiny)
        except ArtifactError as e:
            box["error"] = e

    assert peak_growth_mb(os.getpid(), load) < 50
    assert "expected" in str(box["error"])


def test_peft_ranks_follow_rank_pattern(tiny):
    rank = lambda key: 4 if key.startswith("layers.0.") else 8  # noqa: E731
    module = load_peft(read_artifact(_peft(tiny, {"rank_pattern": {"layers.0.self_attn.q_proj": 4}}, rank)), tiny)
    assert {k: a.shape[0] for k, a in module.A.items()} == {"layers__0__self_attn__q_proj": 4,
                                                             "layers__1__self_attn__q_proj": 8}
    with pytest.raises(ArtifactError, match=r"layers\.1\.self_attn\.q_proj\.lora_A\.weight has shape \(8, 64\)"):
        load_peft(read_artifact(_peft(tiny, {"r": 4}, rank)), tiny)


def test_label_caps(tiny):
    ref = BackboneRef.of(tiny)
    with pytest.raises(ValidationError, match="at most"):
        Manifest(kind="template", backbone=ref, labels={f"l{i}": f" w{i}" for i in range(MAX_LABELS + 1)})
    Manifest(kind="template", backbone=ref, labels={f"l{i}": f" w{i}" for i in range(MAX_LABELS)})
    with pytest.raises(ValueError, match="verbalizer is"):
        kind_class("template").new(tiny, labels={"a": " yes", "b": "x" * (MAX_LABEL_TOKENS + 1)})
    kind_class("template").new(tiny, labels={"a": " yes", "b": "x" * MAX_LABEL_TOKENS})


# --- probe_tokens: an upper bound of what a row's probes put through the backbone -----------------


def _probe_tokens(module, ids, context=None) -> int:
    probe = module.probe(ids, context or Context())
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
    context = Context(Corpus(Retriever(tiny, progress=False).build(CORPUS), CORPUS) if kind == "rrr" else None)
    for text in ["Which zebra is extinct?", "sea otters and the capital of France on the Seine " * 3]:
        ids = module.encode(text)
        assert _probe_tokens(module, ids, context) <= module.probe_tokens(len(ids))
    if kind == "idpt":
        assert module.probe_tokens(len(ids)) == _probe_tokens(module, ids)  # exact: one encoder row
    if kind == "rrr" and module.config.rerank:
        assert _probe_tokens(module, ids, context) > 0
