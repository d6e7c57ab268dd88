"""PEFT adapter folders -> native modules.

A zip of a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) becomes a
`lora`, `prompt` or `prefix` module with the same weights: LoRA (any targets, ranks, alpha,
rsLoRA, rank/alpha patterns), prompt tuning, P-tuning (PEFT saves the prompt encoder's output) and
prefix tuning (PEFT saves the projected keys and values). Pickle `adapter_model.bin` files are
refused; so are adapters whose shapes do not fit this backbone.
"""

from __future__ import annotations

import re
from collections import Counter

import torch

from modules.artifact import ArtifactError
from modules.backbone import Backbone
from modules.base import BackboneMismatch, BackboneRef, Manifest, TaskModule, kind_class, loads

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(layers\.\d+\.[\w.]+?)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def is_peft(files: dict[str, bytes]) -> bool:
    return CONFIG_FILE in files


def _pattern_value(pattern: dict, key: str, default):
    """PEFT's rule: a pattern matches a module name that ends with it (after a dot)."""
    for pat, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({pat})$", f"model.{key}"):
            return value
    return default


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
    A, B = {}, {}
    for name, t in tensors.items():
        m = _LORA_KEY.match(name)
        if not m:
            raise ArtifactError(f"unexpected tensor {name!r} in a PEFT LoRA adapter")
        (A if m.group(2) == "A" else B)[m.group(1)] = t
    if not A or set(A) != set(B):
        raise ArtifactError("PEFT LoRA adapter needs a lora_A and a lora_B weight for every adapted layer")
    for key in A:
        if key not in backbone.linear_keys:
            raise BackboneMismatch(f"PEFT adapter adapts {key}, which this backbone ({backbone.name}) does not have")
        fan_in, fan_out = backbone.linear_keys[key]
        r = A[key].shape[0]
        if tuple(A[key].shape) != (r, fan_in) or tuple(B[key].shape) != (fan_out, r):
            raise BackboneMismatch(
                f"PEFT adapter layer {key} has shapes A{tuple(A[key].shape)} B{tuple(B[key].shape)}; this backbone "
                f"({backbone.name}) needs A(r, {fan_in}) B({fan_out}, r): it was trained on another model")
    ranks = {k: A[k].shape[0] for k in A}
    alphas = {k: float(_pattern_value(cfg.get("alpha_pattern"), k, cfg.get("lora_alpha", 8))) for k in A}
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
    cls = kind_class("lora")
    module = cls(_manifest("lora", config, backbone, cfg), cls.Config(**config), backbone)
    if set(module.scale) != set(A):  # targets x layers may cover layers the adapter skipped
        raise ArtifactError("PEFT LoRA adapter adapts an irregular set of layers that cannot be expressed "
                            f"as targets x layers: {sorted(A)[:6]}...")
    native = {f"lora.A.{k}": A[k] for k in A} | {f"lora.B.{k}": B[k] for k in B}
    return cls.from_tensors(module.manifest, native, backbone)


def _prompt(cfg: dict, tensors: dict[str, torch.Tensor], backbone: Backbone) -> TaskModule:
    emb = _single(tensors)
    if emb.dim() != 2 or emb.shape[1] != backbone.hidden_size:
        raise BackboneMismatch(f"PEFT prompt embeddings have shape {tuple(emb.shape)}; this backbone "
                               f"({backbone.name}) needs (P, {backbone.hidden_size})")
    config = {"num_virtual_tokens": emb.shape[0]}
    return kind_class("prompt").from_tensors(_manifest("prompt", config, backbone, cfg),
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
    return kind_class("prefix").from_tensors(
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
