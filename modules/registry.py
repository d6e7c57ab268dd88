"""The kind registry and the artifact loader: the one place that knows every kind.

Example::

    cls = kind_class("prompt")               # loud error on unknown kinds
    module = cls.new(backbone, cls.Config(num_virtual_tokens=16))
    blob = module.to_artifact()               # zip bytes: module.json + weights.safetensors
    again = load_module(read_artifact(blob), backbone)
"""

from __future__ import annotations

import importlib

from modules.core.artifact import ArtifactError
from modules.core.backbone import Backbone
from modules.core.module import MANIFEST_FILE, WEIGHTS_FILE, TaskModule, parse_manifest, weight_shapes
from modules.peft import is_peft, load_peft

# The kind registry: one line per kind, "kind": "module:Class". Adding a kind = its file + one line.
KINDS: dict[str, str] = {
    "prompt": "modules.kinds.prompt:PromptModule",
    "template": "modules.kinds.template:TemplateModule",
    "lora": "modules.kinds.lora:LoRAModule",
    "prefix": "modules.kinds.prefix:PrefixModule",
    "compose": "modules.kinds.compose:ComposeModule",
    "bitfit": "modules.kinds.bitfit:BitFitModule",
    "ia3": "modules.kinds.ia3:IA3Module",
    "adapter": "modules.kinds.adapter:AdapterModule",
    "said": "modules.kinds.said:SAIDModule",
    "sparse": "modules.kinds.sparse:SparseModule",
    "idpt": "modules.kinds.idpt:IDPTModule",
    "recursive": "modules.kinds.recursive:RecursiveModule",
    "rrr": "modules.kinds.rrr:RRRModule",
    "layernorm": "modules.kinds.layernorm:LayerNormModule",
}


class UnknownKind(ArtifactError):
    def __init__(self, kind: str):
        super().__init__(f"unknown module kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}")


def kind_class(kind: str) -> type["TaskModule"]:
    try:
        target = KINDS[kind]
    except KeyError:
        raise UnknownKind(kind) from None
    mod, _, cls = target.partition(":")
    return getattr(importlib.import_module(mod), cls)


def load_module(files: dict[str, bytes], backbone: Backbone) -> TaskModule:
    """Turn the files of an unpacked artifact into a loaded, validated module."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if MANIFEST_FILE not in files:
        if is_peft(files):
            return load_peft(files, backbone)
        raise ArtifactError(f"artifact has no {MANIFEST_FILE} (nor a PEFT adapter_config.json); "
                            f"files: {sorted(files)[:10]}")
    manifest = parse_manifest(files[MANIFEST_FILE])
    cls = kind_class(manifest.kind)
    if WEIGHTS_FILE not in files:
        raise ArtifactError(f"artifact has no {WEIGHTS_FILE}; weights must be safetensors (never pickle)")
    cls.check(manifest, weight_shapes(files[WEIGHTS_FILE]), backbone)  # before any tensor is read
    try:
        tensors = load(files[WEIGHTS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
    return cls.from_tensors(manifest, tensors, backbone)
