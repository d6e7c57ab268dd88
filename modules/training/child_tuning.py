"""Child-Tuning (Xu et al. 2021, "Raise a Child in Large Language Model"): update only a child
network of the trainable parameters by masking each gradient inside the optimizer step.

Two ways to pick the child network, as in the reference `ChildTuningAdamW` (alibaba/AliceMind):

- **F** (task-free): a fresh Bernoulli(p) mask per parameter at every step; kept gradient entries
  are scaled by 1/p, so the masked gradient is an unbiased estimate of the full one.
- **D** (task-driven): one fixed mask chosen before training: the fraction p of entries with the
  largest diagonal Fisher information, estimated by `fisher_masks` from squared gradients, ranked
  over all tensors together (as the reference does) or within each tensor (`per_tensor`).

The mask is applied before the moment updates, so Adam's moments only ever see masked gradients.
In mode D an entry outside the mask therefore never moves (its moments stay zero), except through
decoupled weight decay, which AdamW applies to every entry (as the reference does too).

Example::

    params = dict(module.named_parameters())
    masks = fisher_masks(params, batches, lambda b: task.loss(b), p=0.3)       # {name: bool tensor}
    optim = ChildTuningAdamW(params.values(), lr=3e-2, mode="D",
                             masks={params[n]: m for n, m in masks.items()})
    # or, task-free:
    optim = ChildTuningAdamW(params.values(), lr=3e-2, mode="F", reserve_p=0.3, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch
from tqdm.auto import tqdm

Mode = Literal["F", "D"]


def _check_p(p: float, name: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must lie in (0, 1] (the fraction of gradient entries kept), got {p!r}")
    return float(p)


class ChildTuningAdamW(torch.optim.AdamW):
    """AdamW that masks every gradient before the moment updates (Child-Tuning F or D).

    mode "F": each step, each parameter's gradient keeps every entry with probability `reserve_p`
    (a torch.Generator seeded with `seed`, one per device) and kept entries are divided by
    `reserve_p`. mode "D": `masks` ({parameter: bool tensor of its shape}) is applied every step;
    parameters without a mask are updated in full (the reference masks only the encoder layers).

    The masked gradient is written back into `p.grad` (as the reference does), so after `step()`
    `p.grad` holds exactly what the moments saw. Other keyword arguments go to `torch.optim.AdamW`.
    """

    def __init__(self, params, lr: float = 1e-3, *, mode: Mode = "F", reserve_p: float = 0.3,
                 masks: Mapping[torch.Tensor, torch.Tensor] | None = None, seed: int = 0, **adamw_kwargs):
        super().__init__(params, lr=lr, **adamw_kwargs)
        if mode not in ("F", "D"):
            raise ValueError(f"mode must be 'F' (task-free) or 'D' (task-driven), got {mode!r}")
        self.mode = mode
        self.reserve_p = _check_p(reserve_p, "reserve_p") if mode == "F" else None
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        if mode == "F":
            if masks is not None:
                raise ValueError("mode 'F' draws its masks each step; pass masks only with mode 'D'")
            return
        if masks is None:
            raise ValueError("mode 'D' needs masks: {parameter: bool tensor}, e.g. from fisher_masks()")
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        for p, m in masks.items():
            if isinstance(p, str):
                raise TypeError(f"masks are keyed by parameter, not by name ({p!r}); "
                                "map names to parameters first: {params[n]: m for n, m in masks.items()}")
            if id(p) not in mine:
                raise ValueError(f"a mask is given for a tensor of shape {tuple(p.shape)} that this optimizer "
                                 "does not update")
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask of shape {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}")
            if m.dtype != torch.bool:
                raise ValueError(f"masks must be bool tensors, got {m.dtype}")
            self.masks[p] = m.to(p.device)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Mask (and in mode F rescale) every gradient in place; `step()` calls it first."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ChildTuningAdamW does not support sparse gradients")
                if self.mode == "D":
                    if p in self.masks:
                        p.grad.mul_(self.masks[p])
                else:
                    keep = torch.rand(p.grad.shape, generator=self._generator(p.grad.device),
                                      device=p.grad.device) < self.reserve_p
                    p.grad.mul_(keep).div_(self.reserve_p)

    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.mask_gradients()
        super().step()
        return loss


def fisher_information(params: Mapping[str, torch.Tensor], batches: Iterable,
                       loss_fn: Callable[[object], torch.Tensor], *, max_grad_norm: float | None = None,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """The diagonal Fisher information estimate of each parameter: the mean over `batches` of the
    squared gradient of `loss_fn(batch)`. {name: float32 tensor of the parameter's shape}

    `max_grad_norm` clips each parameter's gradient (per tensor) before squaring, as the reference
    does. Gradients already in `.grad` are kept aside and put back afterwards."""
    if not params:
        raise ValueError("no parameters given")
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameters without requires_grad cannot get a Fisher estimate: {frozen[:5]}")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    saved = {n: p.grad for n, p in params.items()}
    count = 0
    try:
        for batch in tqdm(batches, desc="fisher", disable=not progress, leave=False):
            for p in params.values():
                p.grad = None
            loss = loss_fn(batch)
            loss.backward()
            for n, p in params.items():
                if p.grad is None:  # this batch does not reach the parameter: its gradient is zero
                    continue
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(p, max_grad_norm)
                fisher[n] += p.grad.detach().float() ** 2
            count += 1
    finally:
        for n, p in params.items():
            p.grad = saved[n]
    if count == 0:
        raise ValueError("no batches: the Fisher information needs at least one batch")
    return {n: f / count for n, f in fisher.items()}


def top_p_masks(scores: Mapping[str, torch.Tensor], p: float, *, per_tensor: bool = False,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep the fraction `p` of entries with the largest scores. {name: bool tensor}

    Ranked over all tensors together (one global threshold, as the reference does): exactly
    round(p * N) entries of the N in all are kept (at least one), ties at the threshold broken
    arbitrarily (the reference's percentile keeps every tie). With `per_tensor`, each tensor keeps
    its own round(p * n) of its n entries (at least one), so no tensor is left out because another
    one's scores are larger; ties are broken in a random order seeded by `seed`."""
    p = _check_p(p, "p")
    if not scores:
        raise ValueError("no scores given")
    if per_tensor:
        generator = torch.Generator().manual_seed(seed)
        return {n: _top_share(s, p, generator) for n, s in scores.items()}
    names = list(scores)
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])  # (N,)
    k = max(1, round(p * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view(scores[n].shape).to(scores[n].device)
        start += size
    return out


def _top_share(score: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """The round(p * n) largest of one tensor's n scores (at least one), equal scores taken in the
    random order `generator` draws. A bool tensor of the score's shape."""
    flat = score.detach().reshape(-1).float().cpu()
    order = torch.randperm(flat.numel(), generator=generator)
    k = max(1, round(p * flat.numel()))
    top = order[torch.sort(flat[order], descending=True, stable=True).indices[:k]]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[top] = True
    return keep.view(score.shape).to(score.device)


def fisher_masks(params: Mapping[str, torch.Tensor], batches: Iterable, loss_fn: Callable[[object], torch.Tensor],
                 p: float, *, per_tensor: bool = False, seed: int = 0, max_grad_norm: float | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Child-Tuning D's child network: the fraction `p` of the entries of `params` with the largest
    diagonal Fisher information over `batches` (squared gradients of `loss_fn(batch)`, averaged
    over batches), over all tensors together or, with `per_tensor`, of each tensor (`top_p_masks`).
    {name: bool tensor}; pass them to `ChildTuningAdamW(mode="D")` keyed by parameter."""
    _check_p(p, "p")  # fail before spending a pass over the data
    fisher = fisher_information(params, batches, loss_fn, max_grad_norm=max_grad_norm, progress=progress)
    return top_p_masks(fisher, p, per_tensor=per_tensor, seed=seed)


def backbone_fisher_masks(backbone, keys: list[str], batches, loss_fn, p: float, *, max_grad_norm: float | None = 1.0,
                          progress: bool = True) -> dict[str, torch.Tensor]:
    """Child-Tuning_D's child network among the backbone's own weights of the linear layers `keys`:
    the top fraction `p` of their entries by diagonal Fisher information (squared gradients of
    `loss_fn(batch)` over `batches`, each layer's gradient clipped to `max_grad_norm` first, as
    the reference does). {key: bool (out, in)}

    Gradients are enabled on those weights only while this runs, and their `requires_grad` and
    `.grad` are restored afterwards; nothing is written into the weights."""
    base = backbone.model.base_model
    weights = {key: base.get_submodule(key).weight for key in keys}
    state = {key: (w.requires_grad, w.grad) for key, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        return fisher_masks(weights, batches, loss_fn, p, max_grad_norm=max_grad_norm, progress=progress)
    finally:
        for key, w in weights.items():
            w.requires_grad_(state[key][0])
            w.grad = state[key][1]
