"""Kind `said`: fine-tuning in a random subspace of intrinsic dimension d (Aghajanyan et al. 2021,
"Intrinsic Dimensionality Explains the Effectiveness of Language Model Fine-Tuning"; Li et al. 2018).

Only theta (d,) is trained. Each chosen linear layer i (a parameter group of D_i = out * in
weights) gets its own fixed random Fastfood projection P_i (D_i, d), regenerated from the seed
in the config, and a weight delta applied per row without touching the shared weights:

    dW_i = lambda_i * reshape_(out, in)(P_i theta)        y' = y + x @ dW_i.T

    P_i theta = [H G Pi H B pad_L(theta)]_(0:D_i) / sqrt(D_i * sum(G^2))

- L = 2^ceil(log2(max(D_i, d))); pad_L appends zeros to theta up to length L; [.]_(0:D_i)
  keeps the first D_i entries (row-major over (out, in)).
- H is the L x L unnormalised Walsh-Hadamard matrix (Sylvester order, entries +-1), applied in
  O(L log L) by `fwht`.
- B = diag(b), b uniform in {-1, +1}; Pi the permutation v -> v[perm]; G = diag(g), g ~ N(0, 1).
- b, perm and g are drawn in that order (`torch.randint`, `torch.randperm`, `torch.randn`) from
  a CPU `torch.Generator` seeded with `layer_seed(seed, key)`: the first 8 bytes (little endian,
  top bit cleared) of sha256(f"{seed}/{key}"), so each layer's projection depends only on the
  seed and its own name.
- The scale gives P_i columns of norm close to 1 (as in Aghajanyan et al.'s code: divisor
  sqrt(L * sum(G^2)) times sqrt(D_i / L)).
- lambda_i is SAID's learned per-layer scale (config `said: true`, the default; start 1);
  with `said: false` it is fixed at 1 and not stored (DID).

theta starts at zero, so the module starts as a no-op. The artifact holds theta and lambda only
(d + number of layers numbers); the projections are rebuilt from the seed.

Example::

    m = SAIDModule.new(backbone, {"d": 500, "targets": ["q_proj", "v_proj"], "seed": 1})
"""

from __future__ import annotations

import hashlib
import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.module import TaskModule
from modules.core.targets import ChangesLinears, DenseDeltas, ModuleDelta, Target, select_linears


class SAIDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    d: int = Field(500, ge=1, le=1 << 20, description="Intrinsic dimension: the number of trained numbers.")
    targets: list[Target] = Field(["q_proj", "v_proj"], min_length=1,
                                  description="Linear layers whose weights move in the subspace, by name.")
    layers: list[int] | None = Field(None, description="Decoder layers to adapt; None = all.")
    seed: int = Field(0, ge=0, description="Seeds every layer's Fastfood projection (stored instead of them).")
    said: bool = Field(True, description="Learn a scale per layer (SAID); false = plain intrinsic dimension (DID).")


def fwht(v: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dimension (length a power of two)."""
    L = v.shape[-1]
    h = 1
    while h < L:
        pairs = v.reshape(*v.shape[:-1], L // (2 * h), 2, h)                   # (..., blocks, 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        v = torch.stack((a + b, a - b), dim=-2).reshape(*v.shape[:-1], L)
        h *= 2
    return v


def layer_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def fastfood_vars(D: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b (L,) in {-1, 1}, perm (L,), g (L,)) of one Fastfood projection R^d -> R^D (b and perm
    in small integer types: they are kept per layer while training)."""
    L = 1 << (max(D, d) - 1).bit_length()
    gen = torch.Generator().manual_seed(seed)
    b = (torch.randint(0, 2, (L,), generator=gen) * 2 - 1).to(torch.int8)
    perm = torch.randperm(L, generator=gen).to(torch.int32)
    g = torch.randn(L, generator=gen)
    return b, perm, g


def fastfood(theta: torch.Tensor, D: int, b: torch.Tensor, perm: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """P theta for the Fastfood projection (b, perm, g): (d,) -> (D,), linear and differentiable."""
    L = b.shape[0]
    v = nn.functional.pad(theta, (0, L - theta.shape[0]))                      # (L,)
    v = fwht(fwht(v * b)[perm] * g)[:D]                                         # (D,)
    return v / math.sqrt(D * float(g.double().square().sum()))


class SAIDModule(ChangesLinears, TaskModule):
    kind = "said"
    Config = SAIDConfig

    def __init__(self, manifest, config: SAIDConfig, backbone):
        super().__init__(manifest, config, backbone)
        self.shapes = {key: (fan_out, fan_in) for key, (fan_in, fan_out)
                       in select_linears(backbone, config.targets, config.layers).items()}
        self.index = {key: i for i, key in enumerate(self.shapes)}
        self.theta = nn.Parameter(torch.zeros(config.d))                                  # (d,)
        if config.said:
            self.lam = nn.Parameter(torch.ones(len(self.shapes)))                          # (layers,)
        self._ff: dict[str, tuple] = {}  # Fastfood variables of each layer, kept while training
        self.dense = DenseDeltas(self.delta_weight, lambda key: list(self.parameters()))
        self.delta = ModuleDelta(self, self.shapes)

    def projection(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `key`'s Fastfood variables (b, perm, g), on the module's device."""
        out, inp = self.shapes[key]
        ff = self._ff.get(key)
        if ff is None or ff[0].device != self.theta.device:
            ff = tuple(t.to(self.theta.device) for t in fastfood_vars(out * inp, self.config.d,
                                                                        layer_seed(self.config.seed, key)))
            if torch.is_grad_enabled() and self.theta.requires_grad:  # training: rebuilt every step
                self._ff[key] = ff
        return ff

    def delta_weight(self, key: str) -> torch.Tensor:
        """dW for layer `key` in float32. (out, in)"""
        out, inp = self.shapes[key]
        w = fastfood(self.theta.float(), out * inp, *self.projection(key)).reshape(out, inp)  # (out, in)
        return w * self.lam[self.index[key]].float() if self.config.said else w

    @property
    def nbytes(self) -> int:
        """Stored numbers plus the dense deltas built once at first use (one per layer)."""
        return super().nbytes + sum(o * i for o, i in self.shapes.values()) * self.theta.element_size()

    def change(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + x @ self.dense.get(key, x).T                              # (n, T, in) @ (in, out)
