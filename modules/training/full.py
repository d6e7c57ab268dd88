"""Full fine-tuning, the reference every parameter-efficient method is compared against.

All of the backbone's weights are trained, on a deep copy: the backbone passed in (the served
one) is never written. The loss, the data order, the optimizer and the schedule are those of
`train_module` (modules/training/train.py): the same `_Task` loss over a zero-weight `template`
module (the task's template and label verbalizers), the same seeded batches, AdamW with linear
warm-up then linear decay, gradients clipped to norm 1.0. What comes out is a whole model (a new
`Backbone`), not a module: it cannot join a shared batch with other tasks, and storing it costs
a whole checkpoint per task.

Example::

    result = train_full(backbone, rows, TrainOptions(max_steps=40, lr=5e-5), eval_rows=dev,
                        template="Review: {input}\\nSentiment:",
                        labels={"negative": " negative", "positive": " positive"})
    result.backbone            # the fine-tuned copy; `backbone` is bit-identical to before
    result.module              # the template module (on the copy) that scores the task
    evaluate(kind_class("template").new(result.backbone, template=..., labels=...), result.backbone, other_rows)
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch

from modules.core.backbone import Backbone
from modules.core.module import TaskModule
from modules.registry import kind_class
from modules.training.train import TrainOptions, _Task, default_labels, evaluate, run_steps


@dataclass
class FullResult:
    backbone: Backbone   # the fine-tuned copy
    module: TaskModule   # the task's template module on the copy (scores the task as the server would)
    metrics: dict
    history: list[float] = field(default_factory=list)


def copy_backbone(backbone: Backbone, name: str | None = None) -> Backbone:
    """An independent deep copy of `backbone` (its own weights and hooks), frozen like any backbone.

    The copy's forward hooks are cleared before it is wrapped: deep-copying the model copies the
    original's per-row delta hooks too (they would read the original's pass state)."""
    model = copy.deepcopy(backbone.model)
    for m in model.modules():
        m._forward_hooks.clear()
    return Backbone(model, backbone.tokenizer, name=name or f"{backbone.name} (copy)",
                    device=backbone.device, dtype=backbone.dtype)


def train_full(backbone: Backbone, rows: list[dict], options: TrainOptions | None = None,
               eval_rows: list[dict] | None = None, **manifest_fields) -> FullResult:
    """Fine-tune every weight of a deep copy of `backbone` on `rows`; return the copy.

    `manifest_fields` are a `template` module's (template, labels, chat...): the prompt format
    and verbalizers the loss and the evaluation use, as for `train_module`. Child-Tuning is a
    module trainer option and is refused here."""
    opt = options or TrainOptions()
    if opt.child_tuning is not None:
        raise ValueError("train_full does not take child_tuning (it is an option of train_module)")
    start = time.monotonic()
    torch.manual_seed(opt.seed)
    rng = random.Random(opt.seed)
    if "labels" not in manifest_fields:
        manifest_fields["labels"] = default_labels(rows)
    tuned = copy_backbone(backbone, f"{backbone.name} (fully fine-tuned)")
    params = list(tuned.model.parameters())  # tied weights appear once
    tuned.model.requires_grad_(True)
    module = kind_class("template").new(tuned, **manifest_fields)
    task = _Task(module, tuned)

    total = opt.total_steps(len(rows))
    optim = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    history = run_steps(task, params, optim, rows, opt, total, rng, "train full")  # train_module's batches
    del optim  # its moments are twice the model's size
    tuned.model.requires_grad_(False)
    tuned.model.eval()

    metrics = {"train_steps": total, "train_rows": len(rows), "batch_size": opt.batch_size, "lr": opt.lr,
               "train_loss": round(sum(history[-20:]) / max(1, len(history[-20:])), 4),
               "train_seconds": round(time.monotonic() - start, 1),
               "trainable_params": sum(p.numel() for p in params)}
    if eval_rows:
        metrics.update(evaluate(module, tuned, eval_rows, opt.eval_batch_size, opt.progress))
    return FullResult(tuned, module, metrics, history)


def checkpoint_bytes(backbone: Backbone) -> int:
    """Bytes of the model as one float32 safetensors file (what storing a fully fine-tuned task
    costs): every distinct tensor once (tied weights once, as `save_pretrained` writes them)."""
    from safetensors.torch import save

    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in backbone.model.state_dict().items():
        seen.setdefault(t.data_ptr(), (name, t))
    return len(save({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in seen.values()},
                    metadata={"format": "pt"}))
