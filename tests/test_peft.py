"""PEFT adapters made here on the embedded backbone, uploaded as zipped folders, against PEFT itself:
same greedy continuation over HTTP, next-token logits within 1e-3."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch

from modules.core.artifact import read_artifact
from modules.core.batch import Row, build_pass
from modules.registry import load_module

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "def fibonacci(n):\n   ", "List three fruits:"]


def _peft_configs():
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "lora-attn": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                "o_proj"], init_lora_weights=False),
        "lora-mlp": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj",
                               "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"up_proj": 4},
                               use_rslora=True, layers_to_transform=list(range(0, 30, 3)), init_lora_weights=False),
        "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
        "p-tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=64),
        "prefix-tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    }


def _perturb(peft_model, name: str) -> None:
    """LoRA's B is random already (init_lora_weights=False); make prompt weights matter too."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if p.requires_grad and "lora" not in pname:
                scale = 0.5 if name == "prefix-tuning" else 0.1
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"adapter/{f.name}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def adapters(real_backbone, tmp_path_factory):
    """name -> (zipped PEFT folder, peft model) for every PEFT method."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    folder = real_backbone.model.config._name_or_path
    out = {}
    for name, cfg in _peft_configs().items():
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.manual_seed(0)
        model = get_peft_model(base, cfg).eval()
        _perturb(model, name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        assert (path / "adapter_model.safetensors").is_file()
        out[name] = (_zip_folder(path), model)
    return out


NAMES = ["lora-attn", "lora-mlp", "prompt-tuning", "p-tuning", "prefix-tuning"]


@pytest.mark.parametrize("name", NAMES)
def test_next_token_logits_match_peft(adapters, real_backbone, name):
    blob, peft_model = adapters[name]
    module = load_module(read_artifact(blob), real_backbone)
    assert module.kind == {"lora-attn": "lora", "lora-mlp": "lora", "prefix-tuning": "prefix"}.get(name, "prompt")
    tok = real_backbone.tokenizer
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        with torch.inference_mode():
            ref = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            # ours, inside a batch with a longer base row
            p = build_pass(real_backbone, [Row(ids, module.contribution(ids)), Row(tok(text * 3)["input_ids"])])
            hidden = real_backbone.forward(p.embeds, p.mask, p.positions, p.cache, p.deltas)
            ours = real_backbone.logits(hidden[0, -1])
        base = real_backbone.logits(_plain_hidden(real_backbone, ids))
        assert (ref.logits[0, -1] - base).abs().max() > 1e-2, "the adapter must change the output"
        torch.testing.assert_close(ours, ref.logits[0, -1].float(), atol=1e-3, rtol=0)


def _plain_hidden(backbone, ids):
    p = build_pass(backbone, [Row(ids)])
    with torch.inference_mode():
        return backbone.forward(p.embeds, p.mask, p.positions)[0, -1]


@pytest.mark.parametrize("name", NAMES)
def test_uploaded_peft_zip_generates_like_peft(adapters, admin, real_backbone, name):
    blob, peft_model = adapters[name]
    up = admin.upload(f"peft-{name}", blob)
    assert up.kind in ("lora", "prompt", "prefix")
    tok = real_backbone.tokenizer
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt")
        with torch.inference_mode():
            gen = peft_model.generate(**ids, max_new_tokens=12, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
        expected = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        got = admin.infer(f"peft-{name}", text, max_new_tokens=12, temperature=0).outputs[0].text
        assert got == expected


def test_pickle_adapter_and_foreign_adapter_are_refused(admin, adapters, tmp_path):
    import json

    from clients import Conflict, InvalidRequest

    blob, _ = adapters["lora-attn"]
    files = read_artifact(blob)
    pickled = io.BytesIO()
    with zipfile.ZipFile(pickled, "w") as z:
        z.writestr("adapter_config.json", files["adapter_config.json"])
        z.writestr("adapter_model.bin", b"\x80\x04\x95fake pickle")
    with pytest.raises(InvalidRequest) as e:
        admin.upload("peft-pickle", pickled.getvalue())
    assert "pickle" in e.value.message

    from safetensors.torch import save

    foreign = io.BytesIO()  # a LoRA for a model with hidden size 768 (another backbone)
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                      "target_modules": ["q_proj"]}))
        z.writestr("adapter_model.safetensors", save({
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 768),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(768, 4)}))
    with pytest.raises(Conflict) as e:
        admin.upload("peft-foreign", foreign.getvalue())
    assert e.value.code == "backbone_mismatch" and "768" in e.value.message
