"""Kind `sparse`: a sparse delta on the backbone's own weights (Child-Tuning_D, Xu et al. 2021),
applied per row without touching the shared weights: `y' = y + x @ dW.T`.

Child-Tuning updates only a child network: the weights a mask selects (for Child-Tuning_D, the
ones with the largest Fisher information on the task; see modules/training/child_tuning.py). Here the
selected positions are fixed and their updates are the module's parameters, so the delta is
exactly what Child-Tuning would have written into the weights, kept aside per task.

Tensors per layer: `sparse.indices.<key>` (nnz,) int64, flat row-major positions in the (out, in)
weight, strictly increasing; `sparse.values.<key>` (nnz,) float, starting at zero (a no-op). The
config records nnz per layer, so every tensor's shape is known before the weights are read. dW is
densified once per layer at first use (one dense (out, in) matrix per layer: fine for small
models, counted in `nbytes`).

Trained end to end by `modules.training.train.train_module(backbone, "sparse", rows, config=...)`: with a
`SparseFisherConfig` (targets, layers, reserve_p; no `nnz`) the positions are Child-Tuning_D's
child network, the top reserve_p fraction of the chosen layers' weights by diagonal Fisher
information (`modules.training.child_tuning.backbone_fisher_masks`: squared gradients w.r.t. the backbone's own weights over a
few training batches), and their deltas are then trained; the backbone ends bit-identical.

Example::

    m = SparseModule.from_mask(backbone, {"layers.0.mlp.down_proj": mask})   # mask: bool (out, in)
    m = SparseModule.new(backbone, {"nnz": {"layers.0.self_attn.q_proj": 400}})  # random positions
    result = train_module(backbone, "sparse", rows, config={"targets": ["q_proj", "v_proj"], "reserve_p": 0.01})
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from modules.core.artifact import ArtifactError
from modules.core.module import BackboneRef, Manifest, TaskModule
from modules.core.targets import ChangesLinears, DenseDeltas, ModuleDelta, SlotKeys, Target, slot


class SparseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nnz: dict[str, int] = Field(min_length=1, description="Layer key (e.g. layers.0.mlp.down_proj) -> number "
                                                          "of updated weights in that layer.")
    seed: int = Field(0, description="Seeds the random positions of a module made with `new` (not from a mask).")


class SparseFisherConfig(BaseModel):
    """How the trainer picks a sparse module's positions by Fisher information (Child-Tuning_D).
    Not stored: the artifact's config is the resulting `SparseConfig` (nnz per layer)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(["q_proj", "v_proj"], min_length=1,
                                  description="Linear layers whose weights may be updated, by name.")
    layers: list[int] | None = Field(None, description="Decoder layers; None = all.")
    reserve_p: float = Field(0.01, gt=0.0, le=1.0,
                             description="Fraction of the chosen weights updated (ranked over all of them together).")


class SparseModule(ChangesLinears, SlotKeys, TaskModule):
    kind = "sparse"
    Config = SparseConfig

    def __init__(self, manifest, config: SparseConfig, backbone):
        super().__init__(manifest, config, backbone)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.values = nn.ParameterDict()
        self.indices = nn.Module()  # buffers indices.<slot>: int64, kept out of dtype casts
        for key, n in config.nnz.items():
            if key not in backbone.linear_keys:
                raise ArtifactError(f"{key!r} is not a linear layer of this backbone")
            fan_in, fan_out = backbone.linear_keys[key]
            if not 1 <= n <= fan_in * fan_out:
                raise ArtifactError(f"nnz for {key} must be in 1..{fan_in * fan_out}, got {n}")
            self.shapes[key] = (fan_out, fan_in)
            self.values[slot(key)] = nn.Parameter(torch.zeros(n))                               # (nnz,)
            self.indices.register_buffer(slot(key), torch.arange(n))                           # (nnz,)
        self.dense = DenseDeltas(self.delta_weight,
                                 lambda key: [self.values[slot(key)], self.indices.get_buffer(slot(key))])
        self.delta = ModuleDelta(self, self.shapes)

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """Random positions (seeded), values 0. A mask-made module gets its positions from the mask."""
        g = torch.Generator().manual_seed(self.config.seed)
        for key, (out, inp) in self.shapes.items():
            idx = self.indices.get_buffer(slot(key))
            idx.copy_(torch.randperm(out * inp, generator=g)[:idx.numel()].sort().values)

    @classmethod
    def from_mask(cls, backbone, masks: dict[str, torch.Tensor], **manifest_fields) -> "SparseModule":
        """A trainable module updating exactly the True positions of each layer's mask (out, in),
        values starting at zero. Layers whose mask selects nothing are left out."""
        nnz, flat = {}, {}
        for key, mask in masks.items():
            fan_in, fan_out = backbone.linear_keys.get(key, (None, None))
            if tuple(mask.shape) != (fan_out, fan_in):
                raise ValueError(f"mask for {key} has shape {tuple(mask.shape)}, expected {(fan_out, fan_in)}")
            flat[key] = mask.reshape(-1).bool().nonzero().squeeze(1).cpu()                   # (nnz,) increasing
            if flat[key].numel():
                nnz[key] = flat[key].numel()
        cfg = SparseConfig(nnz=nnz)
        manifest = Manifest(kind=cls.kind, backbone=BackboneRef.of(backbone), config=cfg.model_dump(),
                            **manifest_fields)
        module = cls(manifest, cfg, backbone)
        with torch.no_grad():
            for key in nnz:
                module.indices.get_buffer(slot(key)).copy_(flat[key])
        return module.to(backbone.device)

    # --- serialisation: indices stay integers -------------------------------------------------

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        out = super().tensors(device)  # every tensor as float32; put the indices back as int64
        for key in self.shapes:
            out[f"{self.kind}.indices.{key}"] = self.indices.get_buffer(slot(key)).to(device, torch.int64).contiguous()
        return out

    @classmethod
    def from_tensors(cls, manifest, tensors, backbone) -> "SparseModule":
        """The base class checks names, shapes and finiteness of floating tensors; indices are
        checked here (integer, in range, strictly increasing) and pass the base checks as float64,
        which holds every index exactly (they are below 2^53), then are loaded back as int64."""
        prefix = f"{cls.kind}.indices."
        checked = dict(tensors)
        for name, t in tensors.items():
            if not name.startswith(prefix):
                continue
            key = name.removeprefix(prefix)
            if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise ArtifactError(f"tensor {name} has dtype {t.dtype}, expected int64 indices")
            if key in backbone.linear_keys and t.dim() == 1 and t.numel():
                fan_in, fan_out = backbone.linear_keys[key]
                t = t.to(torch.int64)
                if int(t.min()) < 0 or int(t.max()) >= fan_in * fan_out:
                    raise ArtifactError(f"tensor {name} has indices outside 0..{fan_in * fan_out - 1}")
                if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
                    raise ArtifactError(f"tensor {name} must be strictly increasing (sorted, no repeats)")
            checked[name] = t.to(torch.float64)
        return super().from_tensors(manifest, checked, backbone)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = f"{self.kind}.indices."
        super().load_tensors({k: v.to(torch.int64) if k.startswith(prefix) else v for k, v in tensors.items()})

    # --- the delta -----------------------------------------------------------------------------

    def delta_weight(self, key: str) -> torch.Tensor:
        """The dense delta of layer `key`, differentiable w.r.t. its values. (out, in)"""
        out, inp = self.shapes[key]
        values = self.values[slot(key)]
        flat = torch.zeros(out * inp, device=values.device, dtype=values.dtype)
        return flat.index_put((self.indices.get_buffer(slot(key)),), values).reshape(out, inp)  # (out, in)

    @property
    def nbytes(self) -> int:
        """Stored tensors plus the dense deltas built once at first use (one per layer)."""
        size = next(iter(self.values.values())).element_size()
        return super().nbytes + sum(o * i for o, i in self.shapes.values()) * size

    def change(self, key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + x @ self.dense.get(key, x).T                              # (n, T, in) @ (in, out)
