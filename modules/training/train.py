"""Training any module kind against the frozen backbone.

Rows are `{"input", "target"}` (generation: loss on the target's tokens, then EOS) or
`{"input", "label"}` (classification: cross-entropy over the labels' verbalizer likelihoods, the
same scores the server uses to answer). Only the module's parameters get gradients; the backbone
stays bit-identical.

Child-Tuning (Xu et al. 2021) is a trainer option for every kind (`TrainOptions.child_tuning`):
"F" masks each gradient with a fresh Bernoulli(reserve_p) mask every step (kept entries scaled by
1/reserve_p), "D" with one fixed mask, its child network (`child_network`): the top reserve_p
fraction of each trainable tensor by diagonal Fisher information (squared gradients of this
trainer's loss over `fisher_batches` training batches). The Fisher information is estimated after
`fisher_warmup_steps` plain AdamW steps, which are then undone: at the module's initial state every
tensor upstream of a zero-initialised output (LoRA's A while B = 0, an adapter's down-projection,
ID-PT's generator, SAID's lambda) has zero gradient, so zero Fisher information, and would never be
chosen. Training then starts from the initial state with the mask. Both modes mask inside the
optimizer step, before Adam's moment updates (modules/training/child_tuning.py).

Kind `sparse` without `nnz` in its config is Child-Tuning_D on the backbone's own weights: the
positions are the top `reserve_p` fraction of the chosen layers' weights by Fisher information
(gradients w.r.t. the backbone's weights, enabled for those weights only while the Fisher
information is estimated; the backbone is never written), then their deltas are trained
(`modules.kinds.sparse.SparseFisherConfig`).

Example::

    result = train_module(backbone, "prompt", rows, TrainOptions(max_steps=200),
                          eval_rows=dev, template="Review: {input}\\nSentiment:",
                          labels={"negative": " negative", "positive": " positive"})
    open("sst2.zip", "wb").write(result.artifact)

    # LoRA with Child-Tuning_D; a sparse delta on the backbone's q/v weights (top 1% by Fisher)
    train_module(backbone, "lora", rows, TrainOptions(max_steps=200, lr=2e-3, child_tuning="D", reserve_p=0.3))
    train_module(backbone, "sparse", rows, TrainOptions(max_steps=200, lr=1e-3),
                 config={"targets": ["q_proj", "v_proj"], "reserve_p": 0.01})
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from modules.core.backbone import Backbone
from modules.core.calibration import label_probs
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.module import TaskModule
from modules.core.running import generate
from modules.core.stages import Context, prepare
from modules.core.targets import select_linears
from modules.kinds.sparse import SparseFisherConfig, SparseModule
from modules.registry import kind_class
from modules.training.child_tuning import ChildTuningAdamW, _check_p, backbone_fisher_masks, fisher_masks


@dataclass
class TrainOptions:
    max_steps: int | None = None  # with epochs too, whichever ends first; neither = one epoch
    epochs: float | None = None
    lr: float = 3e-2
    batch_size: int = 8
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 32
    progress: bool = True
    # Child-Tuning (Xu et al. 2021), for any kind: None (plain AdamW), "F" (task-free: a fresh
    # Bernoulli(reserve_p) gradient mask each step, kept entries scaled by 1/reserve_p) or "D"
    # (task-driven: a fixed mask of the top reserve_p fraction of each trainable tensor by
    # Fisher information over `fisher_batches` training batches, None = one pass over all rows,
    # estimated after `fisher_warmup_steps` AdamW steps that are then undone; see child_network).
    child_tuning: Literal["F", "D"] | None = None
    reserve_p: float = 0.3
    fisher_batches: int | None = 8
    fisher_warmup_steps: int = 10

    def __post_init__(self):
        if self.child_tuning not in (None, "F", "D"):
            raise ValueError(f"child_tuning must be None, 'F' or 'D', got {self.child_tuning!r}")
        _check_p(self.reserve_p, "reserve_p")
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise ValueError(f"fisher_batches must be at least 1 (or None: every training row), "
                             f"got {self.fisher_batches}")
        if self.fisher_warmup_steps < 0:
            raise ValueError(f"fisher_warmup_steps must be at least 0, got {self.fisher_warmup_steps}")

    def total_steps(self, rows: int) -> int:
        """Optimizer steps for `rows` training rows: max_steps, capped by epochs when both are set;
        one epoch when neither is."""
        per_epoch = math.ceil(rows / self.batch_size)
        by_epochs = math.ceil(self.epochs * per_epoch) if self.epochs else None
        if self.max_steps is None:
            return by_epochs or per_epoch
        return min(self.max_steps, by_epochs) if by_epochs else self.max_steps


@dataclass
class TrainResult:
    module: TaskModule
    metrics: dict
    history: list[float] = field(default_factory=list)

    @property
    def artifact(self) -> bytes:
        return self.module.to_artifact(metrics=self.metrics)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if not isinstance(row, dict) or "input" not in row or not ({"target", "label"} & row.keys()):
                raise ValueError(f'{path}:{n}: a row needs "input" and "target" or "label"')
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def mix(sources: list[tuple[list[dict], float]], n: int, seed: int = 0) -> list[dict]:
    """`n` rows drawn from several data sets with mixing weights (each set sampled without
    replacement, cycling once exhausted), shuffled together; a row keeps its set's index in
    `"source"`. Weights need not sum to 1."""
    if not sources or any(w <= 0 for _, w in sources) or any(not rows for rows, _ in sources):
        raise ValueError("mix needs non-empty data sets with positive weights")
    rng = random.Random(seed)
    total = sum(w for _, w in sources)
    counts = [int(n * w / total) for _, w in sources]
    for k in sorted(range(len(sources)), key=lambda k: -(n * sources[k][1] / total - counts[k]))[:n - sum(counts)]:
        counts[k] += 1  # largest remainders: the counts sum to n
    out = []
    for k, ((rows, _), c) in enumerate(zip(sources, counts)):
        order = []
        while len(order) < c:
            block = list(range(len(rows)))
            rng.shuffle(block)
            order += block
        out += [{**rows[i], "source": k} for i in order[:c]]
    rng.shuffle(out)
    return out


def lm_rows(texts: list[str], min_words: int = 8, max_target_words: int = 24, seed: int = 0) -> list[dict]:
    """Language-modelling rows from plain texts (connector pre-training): each text of at least
    `min_words` words is cut at a random word in its middle third; the beginning is the input,
    the next words (at most `max_target_words`) the target."""
    rng = random.Random(seed)
    rows = []
    for text in texts:
        words = text.split()
        if len(words) < min_words:
            continue
        cut = rng.randint(len(words) // 3, 2 * len(words) // 3)
        rows.append({"input": " ".join(words[:cut]), "target": " ".join(words[cut:cut + max_target_words])})
    if not rows:
        raise ValueError(f"no text has {min_words} words or more")
    return rows


def default_labels(rows: list[dict]) -> dict[str, str] | None:
    """label -> " label" for classification data, None for generation data."""
    names = sorted({str(r["label"]) for r in rows if "label" in r})
    return {n: f" {n}" for n in names} or None


class _Task:
    """Turns rows into scoring items for one module (labels or targets)."""

    def __init__(self, module: TaskModule, backbone: Backbone, context: Context | None = None):
        self.module, self.backbone, self.context = module, backbone, context  # context: e.g. rrr's documents
        tok = backbone.tokenizer
        self.label_names = list(module.manifest.labels or {})
        eos = tok.eos_token_id
        self._target = lambda t: tok(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])

    def items(self, rows: list[dict]) -> list[ScoreItem]:
        prepared = prepare(self.backbone, [(self.module, self.module.encode(str(r["input"])), self.context)
                                           for r in rows])
        return [ScoreItem(p.ids, p.contribution,
                          self.module.label_ids if "label" in r else [self._target(str(r["target"]))])
                for r, p in zip(rows, prepared)]

    def loss(self, rows: list[dict]) -> torch.Tensor:
        lls = score(self.backbone, self.items(rows))
        losses = []
        for r, ll in zip(rows, lls):
            if "label" in r:
                gold = self.label_names.index(str(r["label"]))
                losses.append(torch.nn.functional.cross_entropy(ll[None], torch.tensor([gold], device=ll.device)))
            else:
                losses.append(-ll[0] / len(self._target(str(r["target"]))))
        return torch.stack(losses).mean()


@torch.inference_mode()
def evaluate(module: TaskModule, backbone: Backbone, rows: list[dict], batch_size: int = 32,
             progress: bool = False) -> dict:
    """accuracy on label rows, exact match on target rows (greedy)."""
    task = _Task(module, backbone)
    labelled = [r for r in rows if "label" in r]
    targeted = [r for r in rows if "label" not in r]
    metrics: dict = {}
    bar = tqdm(total=len(rows), desc="eval", disable=not progress, leave=False)
    if labelled:
        lls = []
        for i in range(0, len(labelled), batch_size):
            chunk = labelled[i:i + batch_size]
            lls += score(backbone, task.items(chunk))
            bar.update(len(chunk))
        probs = label_probs(backbone, module, lls, frozen=False)  # the module's scoring (calibration...)
        correct = sum(task.label_names[int(p.argmax())] == str(r["label"]) for r, p in zip(labelled, probs))
        metrics["eval_accuracy"] = round(correct / len(labelled), 4)
    if targeted:
        hits = 0
        gen = module.manifest.generation
        for i in range(0, len(targeted), batch_size):
            chunk = targeted[i:i + batch_size]
            prepared = prepare(backbone, [(module, module.encode(str(r["input"]))) for r in chunk])
            items = [GenItem(p.ids, p.contribution,
                             Sampling(max_new_tokens=len(task._target(str(r["target"]))) + 2, stop=gen.stop))
                     for r, p in zip(chunk, prepared)]
            for r, g in zip(chunk, generate(backbone, items)):
                hits += g.text.strip() == str(r["target"]).strip()
            bar.update(len(chunk))
        metrics["eval_exact_match"] = round(hits / len(targeted), 4)
    bar.close()
    metrics["eval_rows"] = len(rows)
    return metrics


def _shuffled_batches(rows: list[dict], batch_size: int, n: int | None, stream: str) -> list[list[dict]]:
    """`n` batches of `batch_size` rows from a shuffle seeded by `stream` (cycling if the data is
    short), or every row once when `n` is None. Its own stream: the training order is unchanged."""
    rng = random.Random(stream)
    count = math.ceil(len(rows) / batch_size) if n is None else n
    order: list[int] = []
    while len(order) < count * batch_size:
        block = list(range(len(rows)))
        rng.shuffle(block)
        order += block
        if n is None:
            break
    return [[rows[i] for i in order[k * batch_size:(k + 1) * batch_size]] for k in range(count)]


def fisher_batches(rows: list[dict], opt: TrainOptions) -> list[list[dict]]:
    """The training batches the Fisher information is estimated on (Child-Tuning_D, kind sparse):
    `opt.fisher_batches` batches of `opt.batch_size` rows from a seeded shuffle (cycling if the
    data is short), or every row once when `opt.fisher_batches` is None."""
    return _shuffled_batches(rows, opt.batch_size, opt.fisher_batches, f"fisher/{opt.seed}")


def _step(task: "_Task", params: list[torch.Tensor], optim: torch.optim.Optimizer, batch: list[dict]) -> float:
    """One training step on `batch` (gradients clipped to norm 1.0); returns the loss."""
    loss = task.loss(batch)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    return loss.item()


def child_network(module: TaskModule, task: "_Task", rows: list[dict], opt: TrainOptions) -> dict[str, torch.Tensor]:
    """Child-Tuning_D's mask for `module`: in each trainable tensor, the top `opt.reserve_p`
    fraction of its entries by diagonal Fisher information (ties in an order seeded by `opt.seed`).
    {parameter name: bool tensor}

    The Fisher information is estimated (on `fisher_batches`, each tensor's gradient clipped to
    1.0 before squaring, as the reference does) after `opt.fisher_warmup_steps` plain AdamW steps
    on the training rows, so that tensors upstream of a zero-initialised output have a gradient.
    Per tensor, so that no tensor is left out because another's gradients are larger. The
    warm-up is undone: the module's parameters are restored and their gradients cleared."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in named.items()}
    try:
        warm = torch.optim.AdamW(module.param_groups(opt.lr), lr=opt.lr, weight_decay=opt.weight_decay)
        for batch in _shuffled_batches(rows, opt.batch_size, opt.fisher_warmup_steps, f"fisher-warmup/{opt.seed}"):
            _step(task, list(named.values()), warm, batch)
        return fisher_masks(named, fisher_batches(rows, opt), task.loss, opt.reserve_p, per_tensor=True,
                            seed=opt.seed, max_grad_norm=1.0, progress=opt.progress)
    finally:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(initial[n])
                p.grad = None


def _sparse_by_fisher(backbone: Backbone, rows: list[dict], opt: TrainOptions, config: dict | None,
                      manifest_fields: dict) -> tuple[TaskModule, dict] | None:
    """Kind sparse by Child-Tuning_D on the backbone's weights: positions = the top reserve_p
    fraction of the chosen layers' weights by Fisher information under this trainer's loss.
    None when the config fixes the positions itself (`nnz`)."""
    if "nnz" in (config or {}):
        return None
    cfg = SparseFisherConfig(**(config or {}))
    keys = list(select_linears(backbone, cfg.targets, cfg.layers))
    probe = kind_class("template").new(backbone, None, **manifest_fields)  # same template and labels, no weights
    batches = fisher_batches(rows, opt)
    masks = backbone_fisher_masks(backbone, keys, batches, _Task(probe, backbone).loss, cfg.reserve_p,
                                  progress=opt.progress)
    module = SparseModule.from_mask(backbone, masks, **manifest_fields)
    info = {"fisher": {**cfg.model_dump(), "batches": len(batches),
                       "candidates": sum(int(m.numel()) for m in masks.values()),
                       "selected": sum(int(m.sum()) for m in masks.values())}}
    return module, info


def run_steps(task: "_Task", params: list, optim: torch.optim.Optimizer, rows: list[dict], opt: TrainOptions,
              total: int, rng: random.Random, desc: str) -> list[float]:
    """`total` optimizer steps over shuffled batches of `rows` (reshuffled at every pass), linear
    warm-up then linear decay to 0; the loss of each step."""
    warm = min(opt.warmup_steps, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    order: list[int] = []
    history: list[float] = []
    bar = tqdm(range(total), desc=desc, disable=not opt.progress)
    for _ in bar:
        if len(order) < opt.batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        batch = [rows[i] for i in order[:opt.batch_size]]
        del order[:opt.batch_size]
        history.append(_step(task, params, optim, batch))
        sched.step()
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.4f}")
    return history


# Kinds whose shape the training data chooses when their config leaves it open.
_FROM_DATA = {"sparse": _sparse_by_fisher}


def make_optimizer(module: TaskModule, task: "_Task", rows: list[dict], opt: TrainOptions) -> tuple[torch.optim.Optimizer, dict]:
    """AdamW over the module's parameter groups, or ChildTuningAdamW (mode F or D) with
    `opt.child_tuning`; mode D estimates its Fisher masks here. Returns it and its metrics."""
    groups = module.param_groups(opt.lr)
    if opt.child_tuning is None:
        return torch.optim.AdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay), {}
    info = {"child_tuning": opt.child_tuning, "reserve_p": opt.reserve_p}
    if opt.child_tuning == "F":
        optim = ChildTuningAdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay, mode="F",
                                 reserve_p=opt.reserve_p, seed=opt.seed)
        return optim, info
    masks = child_network(module, task, rows, opt)
    named = dict(module.named_parameters())
    optim = ChildTuningAdamW(groups, lr=opt.lr, weight_decay=opt.weight_decay, mode="D",
                             masks={named[n]: m for n, m in masks.items()})
    info.update(fisher_batches=len(fisher_batches(rows, opt)), fisher_warmup_steps=opt.fisher_warmup_steps,
                child_params=sum(int(m.sum()) for m in masks.values()))
    return optim, info


def train_module(backbone: Backbone, kind: str, rows: list[dict], options: TrainOptions | None = None,
                 eval_rows: list[dict] | None = None, config: dict | None = None,
                 init: TaskModule | None = None, **manifest_fields) -> TrainResult:
    """Train a new module of `kind` on `rows`; return it with its metrics.

    `init`: start from this module's weights (same kind; its config is used), e.g. a recursive
    module whose connector was pre-trained on language modelling."""
    opt = options or TrainOptions()
    start = time.monotonic()  # train_seconds counts a Fisher estimate (and its warm-up) too
    torch.manual_seed(opt.seed)
    rng = random.Random(opt.seed)
    if "labels" not in manifest_fields:
        manifest_fields["labels"] = default_labels(rows)
    if init is not None:
        if init.kind != kind:
            raise ValueError(f"cannot start a {kind} module from a {init.kind} module")
        config = init.manifest.config
    from_data = _FROM_DATA.get(kind) if init is None else None
    module, extra = (from_data and from_data(backbone, rows, opt, config, manifest_fields)) or \
        (kind_class(kind).new(backbone, config, **manifest_fields), {})
    if init is not None:
        module.load_tensors(init.tensors())
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    task = _Task(module, backbone)

    total = opt.total_steps(len(rows))
    optim, child = make_optimizer(module, task, rows, opt)
    extra.update(child)
    history = run_steps(task, params, optim, rows, opt, total, rng, f"train {kind}")
    module.eval()
    module.requires_grad_(False)

    metrics = {"train_steps": total, "train_rows": len(rows), "batch_size": opt.batch_size, "lr": opt.lr,
               "train_loss": round(sum(history[-20:]) / max(1, len(history[-20:])), 4),
               "train_seconds": round(time.monotonic() - start, 1),
               "trainable_params": sum(p.numel() for p in params), **extra}
    if eval_rows:
        metrics.update(evaluate(module, backbone, eval_rows, opt.eval_batch_size, opt.progress))
    return TrainResult(module, metrics, history)
