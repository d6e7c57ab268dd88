"""The module protocol: manifest, registry, artifact round trip, validation against the backbone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from modules.core.artifact import ArtifactError, pack, read_artifact
from modules.core.module import BackboneMismatch, Manifest
from modules.registry import KINDS, UnknownKind, kind_class, load_module
from tests.conftest import tiny_backbone

LABELS = {"negative": " bad", "positive": " good"}


def _prompt(tiny, **cfg):
    return kind_class("prompt").new(tiny, {"num_virtual_tokens": 5, **cfg}, template="T: {input} ->", labels=LABELS)


def test_artifact_round_trip_keeps_weights_and_manifest(tiny):
    m = _prompt(tiny)
    blob = m.to_artifact(metrics={"eval_accuracy": 0.5})
    files = read_artifact(blob)
    assert set(files) == {"module.json", "weights.safetensors"}
    again = load_module(files, tiny)
    assert again.kind == "prompt" and again.manifest.metrics == {"eval_accuracy": 0.5}
    torch.testing.assert_close(again.embeddings, m.embeddings, rtol=0, atol=0)
    assert again.manifest.labels == LABELS and again.manifest.template == "T: {input} ->"
    assert not any(p.requires_grad for p in again.parameters())


@pytest.mark.parametrize("init,kw", [("vocab", {}), ("text", {"init_text": "hello"}), ("labels", {})])
def test_prompt_initialisation(tiny, init, kw):
    m = _prompt(tiny, init=init, **kw)
    table = tiny.model.get_input_embeddings().weight
    if init == "text":
        ids = tiny.tokenizer("hello", add_special_tokens=False)["input_ids"]
        expect = table[(ids * 5)[:5]]
    elif init == "labels":
        ids = sum((tiny.tokenizer(v, add_special_tokens=False)["input_ids"] for v in LABELS.values()), [])
        expect = table[(ids * 5)[:5]]
    else:  # each vector is some row of the vocabulary
        assert all((table == row).all(-1).any() for row in m.embeddings)
        return
    torch.testing.assert_close(m.embeddings, expect, rtol=0, atol=0)


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(UnknownKind) as e:
        kind_class("nope")
    for k in KINDS:
        assert k in str(e.value)


def _files(tiny, manifest_patch=None, tensors=None):
    m = _prompt(tiny)
    manifest = json.loads(m.manifest.model_dump_json())
    manifest.update(manifest_patch or {})
    return {"module.json": json.dumps(manifest).encode(),
            "weights.safetensors": save(tensors if tensors is not None else m.tensors())}


@pytest.mark.parametrize("patch,needle", [
    ({"kind": "bogus"}, "unknown module kind"),
    ({"surprise": 1}, "Extra inputs"),
    ({"template": "no placeholder"}, "{input}"),
    ({"format": "frozenlm.module/9"}, "format"),
    ({"config": {"num_virtual_tokens": 5, "bogus": 1}}, "invalid prompt config"),
    ({"config": {"num_virtual_tokens": 100000}}, "less than or equal to 512"),  # the cap on virtual tokens
    ({"labels": {"only": " one"}}, "at least two labels"),
])
def test_bad_manifests_are_refused(tiny, patch, needle):
    with pytest.raises(ArtifactError, match=None) as e:
        load_module(_files(tiny, patch), tiny)
    assert needle in str(e.value)


@pytest.mark.parametrize("tensors,needle", [
    ({"prompt.embeddings": torch.zeros(4, 64)}, "shape"),
    ({"prompt.embeddings": torch.zeros(5, 63)}, "shape"),
    ({"prompt.embeddings": torch.zeros(5, 64, dtype=torch.int32)}, "dtype"),
    ({"prompt.embeddings": torch.full((5, 64), float("nan"))}, "NaN"),
    ({"prompt.embeddings": torch.zeros(5, 64), "prompt.extra": torch.zeros(1)}, "expected tensors"),
    ({}, "expected tensors"),
])
def test_bad_weights_are_refused(tiny, tensors, needle):
    with pytest.raises(ArtifactError) as e:
        load_module(_files(tiny, tensors=tensors), tiny)
    assert needle in str(e.value)


def test_pickle_weights_are_refused(tiny):
    files = _files(tiny)
    files["weights.safetensors"] = b"\x80\x04\x95" + b"\x00" * 64  # a pickle header
    with pytest.raises(ArtifactError, match="safetensors"):
        load_module(files, tiny)
    del files["weights.safetensors"]
    files["adapter_model.bin"] = b"\x80\x04"
    with pytest.raises(ArtifactError, match="never pickle"):
        load_module(files, tiny)


def test_module_for_another_backbone_is_refused(tiny):
    other = tiny_backbone(seed=1)
    assert other.info.fingerprint != tiny.info.fingerprint
    blob = _prompt(other).to_artifact()
    with pytest.raises(BackboneMismatch) as e:
        load_module(read_artifact(blob), tiny)
    assert other.info.fingerprint in str(e.value) and tiny.info.fingerprint in str(e.value)


def test_fingerprint_ignores_dtype_but_not_weights(tiny):
    from modules.core.backbone import fingerprint

    model = tiny_backbone().model
    assert fingerprint(model) == tiny.info.fingerprint
    assert fingerprint(tiny_backbone().model.to(torch.bfloat16)) == tiny.info.fingerprint
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(model) != tiny.info.fingerprint


def test_manifest_schema_forbids_unknown_fields():
    with pytest.raises(ValueError):
        Manifest.model_validate({"kind": "prompt", "backbone": {"model_type": "llama", "hidden_size": 1,
                                 "num_layers": 1, "vocab_size": 1, "fingerprint": "x"}, "whatever": 1})


def test_pack_is_reproducible_and_accepts_a_folder_zip(tiny):
    files = _files(tiny)
    assert pack(files) == pack(dict(reversed(list(files.items()))))
    nested = read_artifact(pack({f"mymodule/{k}": v for k, v in files.items()}))
    assert load_module(nested, tiny).kind == "prompt"


def test_lora_rank_is_capped(tiny):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="less than or equal to 256"):
        kind_class("lora").Config(r=1024)
