"""PEFT adapter folders -> native modules.

A zip of a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) becomes a
`lora`, `prompt` or `prefix` module with the same weights: LoRA (any targets, ranks, alpha,
rsLoRA, rank/alpha patterns), prompt tuning, P-tuning (PEFT saves the prompt encoder's output) and
prefix tuning (PEFT saves the projected keys and values). Pickle `adapter_model.bin` files are
refused; so are adapters whose shapes do not fit this backbone, LoRA tensors whose rank is not
the one `r` and `rank_pattern` give (as PEFT itself refuses them), and NaN or Infinity anywhere in
`adapter_config.json`. Patterns are matched by `modules.core.targets.pattern_values` (time-bounded).
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from modules.core.artifact import ArtifactError
from modules.core.backbone import Backbone
from modules.core.module import BackboneMismatch, BackboneRef, Manifest, TaskModule, loads
from modules.core.targets import pattern_values, select_linears
from modules.kinds.lora import LoRAModule
from modules.kinds.prefix import PrefixModule
from modules.kinds.prompt import PromptModule

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(layers\.\d+\.[\w.]+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def is_peft(files: dict[str, bytes]) -> bool:
    return CONFIG_FILE in files


def _manifest(kind: str, config: dict, backbone: Backbone, cfg: dict) -> Manifest:
    source = cfg.get("base_model_name_or_path") or "unknown base model"
    return Manifest(kind=kind, backbone=BackboneRef.of(backbone), config=config,
                    description=f"imported from a PEFT {cfg.get('peft_type')} adapter for {source}")


def _lora(cfg: dict, tensors: dict[str, torch.Tensor], backbone: Backbone) -> TaskModule:
    for flag, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(flag) is bad:
            raise ArtifactError(f"PEFT LoRA with {flag}={bad} is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ArtifactError("PEFT LoRA with trained biases or modules_to_save is not supported")
    A, B, names = {}, {}, {}
    for name, t in tensors.items():
        m = _LORA_KEY.match(name)
        if not m:
            raise ArtifactError(f"unexpected tensor {name!r} in a PEFT LoRA adapter")
        (A if m.group(2) == "A" else B)[m.group(1)] = t
        names[m.group(1), m.group(2)] = name
    if not A or set(A) != set(B):
        raise ArtifactError("PEFT LoRA adapter needs a lora_A and a lora_B weight for every adapted layer")
    for key in A:
        if key not in backbone.linear_keys:
            raise BackboneMismatch(f"PEFT adapter adapts {key}, which this backbone ({backbone.name}) does not have")
        fan_in, fan_out = backbone.linear_keys[key]
        a, b = tuple(A[key].shape), tuple(B[key].shape)
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out:
            raise BackboneMismatch(
                f"PEFT adapter layer {key} has shapes A{a} B{b}; this backbone ({backbone.name}) needs "
                f"A(r, {fan_in}) B({fan_out}, r): it was trained on another model")
    ranks = _by_pattern(cfg, "rank_pattern", A, cfg.get("r", 8))
    for key, r in ranks.items():
        fan_in, fan_out = backbone.linear_keys[key]
        for part, t, want in (("A", A[key], (r, fan_in)), ("B", B[key], (fan_out, r))):
            if tuple(t.shape) != want:
                raise ArtifactError(f"tensor {names[key, part]} has shape {tuple(t.shape)}, but {CONFIG_FILE} "
                                    f"(r and rank_pattern) implies {want}")
    alphas = _by_pattern(cfg, "alpha_pattern", A, cfg.get("lora_alpha", 8))
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    layers = sorted({int(k.split(".")[1]) for k in A})
    config = {
        "targets": sorted({k.rsplit(".", 1)[-1] for k in A}),
        "r": r0, "alpha": a0, "rslora": bool(cfg.get("use_rslora", False)),
        "layers": None if len(layers) == backbone.info.num_layers else layers,
        "rank_pattern": {re.escape(k): r for k, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(k): a for k, a in alphas.items() if a != a0},
    }
    if set(select_linears(backbone, config["targets"], config["layers"])) != set(A):
        raise ArtifactError("PEFT LoRA adapter adapts an irregular set of layers that cannot be expressed "
                            f"as targets x layers: {sorted(A)[:6]}...")
    native = {f"lora.A.{k}": A[k] for k in A} | {f"lora.B.{k}": B[k] for k in B}
    return LoRAModule.from_tensors(_manifest("lora", config, backbone, cfg), native, backbone)


def _by_pattern(cfg: dict, field: str, keys, default) -> dict:
    """`cfg[field]` (PEFT's rank_pattern or alpha_pattern) applied to each adapted layer."""
    patterns = cfg.get(field) or {}
    if not isinstance(patterns, dict):
        raise ArtifactError(f"{CONFIG_FILE}: {field} must be an object, got {type(patterns).__name__}")
    # PEFT matches the causal LM's inner module names: "model.layers.0.self_attn.q_proj"
    named = pattern_values(patterns, [f"model.{k}" for k in keys], default)
    return {k: named[f"model.{k}"] for k in keys}


def _prompt(cfg: dict, tensors: dict[str, torch.Tensor], backbone: Backbone) -> TaskModule:
    emb = _single(tensors)
    if emb.dim() != 2 or emb.shape[1] != backbone.hidden_size:
        raise BackboneMismatch(f"PEFT prompt embeddings have shape {tuple(emb.shape)}; this backbone "
                               f"({backbone.name}) needs (P, {backbone.hidden_size})")
    config = {"num_virtual_tokens": emb.shape[0]}
    return PromptModule.from_tensors(_manifest("prompt", config, backbone, cfg),
                                             {"prompt.embeddings": emb}, backbone)


def _prefix(cfg: dict, tensors: dict[str, torch.Tensor], backbone: Backbone) -> TaskModule:
    emb = _single(tensors)
    i = backbone.info
    width = 2 * i.num_layers * i.num_kv_heads * i.head_dim
    if emb.dim() != 2 or emb.shape[1] != width:
        raise BackboneMismatch(f"PEFT prefix has shape {tuple(emb.shape)}; this backbone ({backbone.name}) "
                               f"needs (P, {width})")
    P = emb.shape[0]
    kv = emb.view(P, 2 * i.num_layers, i.num_kv_heads, i.head_dim).permute(1, 2, 0, 3)  # (2N, kvh, P, hd)
    config = {"num_virtual_tokens": P}
    return PrefixModule.from_tensors(
        _manifest("prefix", config, backbone, cfg),
        {"prefix.keys": kv[0::2].contiguous(), "prefix.values": kv[1::2].contiguous()}, backbone)


def _single(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise ArtifactError(f"expected one tensor 'prompt_embeddings' in a PEFT prompt adapter, got {sorted(tensors)}")
    return tensors["prompt_embeddings"]


_CONVERTERS = {"LORA": _lora, "PROMPT_TUNING": _prompt, "P_TUNING": _prompt, "PREFIX_TUNING": _prefix}


def load_peft(files: dict[str, bytes], backbone: Backbone) -> TaskModule:
    """A native module from the files of a PEFT adapter folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        cfg = loads(files[CONFIG_FILE])
    except ValueError as e:
        raise ArtifactError(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in _CONVERTERS:
        raise ArtifactError(f"PEFT adapter type {peft_type or '?'} is not supported; "
                            f"supported: {', '.join(sorted(_CONVERTERS))}")
    if WEIGHTS_FILE not in files:
        if any(n.endswith(".bin") for n in files):
            raise ArtifactError("adapter_model.bin is a pickle file and is refused (never unpickled); "
                                "save the adapter with safe_serialization=True to get adapter_model.safetensors")
        raise ArtifactError(f"PEFT adapter has no {WEIGHTS_FILE}")
    try:
        tensors = load(files[WEIGHTS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    try:
        return _CONVERTERS[peft_type](cfg, tensors, backbone)
    except ArtifactError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a config value of the wrong type
        raise ArtifactError(f"invalid PEFT {peft_type} adapter: {e}") from e
