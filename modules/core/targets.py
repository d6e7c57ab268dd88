"""Shared pieces of the kinds that change the backbone's linear layers per row (bitfit, ia3,
adapter, said, sparse): choosing layers, naming their tensors, and caching dense weight deltas.

Example::

    chosen = select_linears(backbone, ["q_proj", "v_proj"], layers=[0, 1])  # {key: (in, out)}
    name = slot("layers.0.self_attn.q_proj")                                 # "layers__0__self_attn__q_proj"
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Literal

import regex
import torch

from modules.core.artifact import ArtifactError
from modules.core.batch import Contribution

Target = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS: tuple[str, ...] = Target.__args__


PATTERN_SECONDS = 0.5  # the most time one module's layer patterns may take to match, all keys together
MAX_PATTERNS, MAX_PATTERN_LENGTH = 256, 256
_NOT_A_REPEAT = regex.compile(r"\{(?!\d*(?:,\d*)?\})")  # e.g. `regex`'s fuzzy matching, "(?:x){e<=3}"


def pattern_values(patterns: dict[str, object], keys: Iterable[str], default) -> dict[str, object]:
    """PEFT's rank/alpha pattern rule: each key gets the value of the first pattern matching the
    end of the key (whole or after a dot), else `default`.

    The patterns are uploaded, so: at most MAX_PATTERNS of at most MAX_PATTERN_LENGTH characters;
    braces for repeat counts only (`regex`'s fuzzy matching, which PEFT's Python patterns do not
    have, grows its memory while it backtracks); run by `regex` with a deadline shared by all keys,
    so a pattern that backtracks without end is an ArtifactError (422), never a stalled server."""
    if len(patterns) > MAX_PATTERNS or any(len(p) > MAX_PATTERN_LENGTH for p in patterns):
        raise ArtifactError(f"at most {MAX_PATTERNS} layer patterns of at most {MAX_PATTERN_LENGTH} characters")
    bad = [p for p in patterns if _NOT_A_REPEAT.search(p)]
    if bad:
        raise ArtifactError(f"invalid layer pattern {bad[0]!r}: braces are for repeat counts {{m,n}} only")
    deadline = time.monotonic() + PATTERN_SECONDS
    try:
        compiled = [(regex.compile(rf"(?:.*\.)?(?:{p})$"), v) for p, v in patterns.items()]
        return {key: next((v for c, v in compiled if c.match(key, timeout=max(deadline - time.monotonic(), 1e-6))),
                          default)
                for key in keys}
    except regex.error as e:
        raise ArtifactError(f"invalid layer pattern: {e}") from e
    except TimeoutError as e:
        raise ArtifactError(f"layer patterns {sorted(patterns)} take more than {PATTERN_SECONDS} s to match "
                            f"this backbone's layer names") from e


def slot(key: str) -> str:
    """A layer key as a parameter name (parameter names may not contain dots)."""
    return key.replace(".", "__")


def layer_of(key: str) -> int:
    return int(key.split(".")[1])


def select_linears(backbone, targets, layers: list[int] | None) -> dict[str, tuple[int, int]]:
    """The hooked linear layers named by `targets` (last key part) in `layers` (None = all):
    {key: (in_features, out_features)}, in the backbone's order. Raises ArtifactError (a
    ValueError; 422 on upload) if none is selected."""
    return _select(backbone.linear_keys, targets, layers, "linear")


def _select(keys: dict, targets, layers: list[int] | None, what: str) -> dict:
    """The entries of `keys` (hooked layers of the backbone) named by `targets` in `layers`; a key
    outside the decoder layers (the final norm) is kept whenever it is a target."""
    wanted = None if layers is None else set(layers)  # a set: a long uploaded list costs no more
    chosen = {key: v for key, v in keys.items() if key.rsplit(".", 1)[-1] in targets
              and (wanted is None or not key.startswith("layers.") or layer_of(key) in wanted)}
    if not chosen:
        raise ArtifactError(f"targets {sorted(targets)} in layers {layers} select no {what} layer of this backbone")
    return chosen


def select_norms(backbone, targets, layers: list[int] | None) -> dict:
    """The hooked normalization layers named by `targets` in `layers` (None = all), as select_linears."""
    return _select(backbone.norm_keys, targets, layers, "normalization")


class ModuleDelta:
    """A module's LinearDelta: one object per module, so the engine groups rows by it; each layer's
    new output is the module's `change(key, x, y)`."""

    def __init__(self, module, keys):
        self.module, self.keys = module, frozenset(keys)

    def __call__(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module.change(key, x, y)


class ChangesLinears:
    """Mixin for a TaskModule whose contribution is a change of some linear layers' outputs: it
    defines `change(key, x, y) -> new y` for its rows and sets `self.delta = ModuleDelta(self, keys)`
    once its tensors exist."""

    delta: ModuleDelta

    def contribution(self, ids: list[int]) -> Contribution:
        return Contribution(linear=self.delta)


class SlotKeys:
    """Mixin for a TaskModule: artifact tensor keys `<group>.<layer key>` for parameters held in
    dicts keyed by `slot(layer key)` (so `bias.layers__0__mlp__up_proj` is stored as
    `bias.layers.0.mlp.up_proj`)."""

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        return {k.replace("__", "."): v for k, v in sd.items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        renamed = {}
        for k, v in state_dict.items():
            group, _, key = k.partition(".")
            renamed[f"{group}.{slot(key)}" if key else group] = v
        return super().load_state_dict(renamed, strict, assign)


class DenseDeltas:
    """Dense weight deltas dW (out, in) built from a module's parameters (said, sparse).

    While the parameters train (grad enabled and required), dW is rebuilt on every call so the
    gradient reaches them. Otherwise it is built once per layer, device and dtype and reused for
    as long as the parameters are unchanged (their version counters are part of the cache key),
    so a loaded module pays for the build once, not once per decode step."""

    def __init__(self, build: Callable[[str], torch.Tensor], params: Callable[[str], list[torch.Tensor]]):
        self.build, self.params = build, params
        self._cache: dict[str, tuple[tuple, torch.Tensor]] = {}

    def get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        params = self.params(key)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self.build(key).to(like.dtype)
        stamp = (like.device, like.dtype, tuple(p._version for p in params))
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            # Built as a normal tensor even inside inference_mode, so later passes may use it freely.
            with torch.inference_mode(False), torch.no_grad():
                hit = (stamp, self.build(key).to(like.device, like.dtype))
            self._cache[key] = hit
        return hit[1]
