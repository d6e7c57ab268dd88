"""Black-Box Tuning (Sun et al. 2022, "Black-Box Tuning for Language-Model-as-a-Service"): learn a
soft prompt with forward passes only.

The prompt is `p = p0 + A z`: p0 (P, H) is an initial prompt, A (P*H, d) a fixed random projection
and z (d,) a small vector (d = 500 in the paper) searched by CMA-ES. As in the reference code
(txsun1997/Black-Box-Tuning), A is drawn from N(0, std^2) with std = alpha * std_hat / (sqrt(d) *
sigma), std_hat the standard deviation of the backbone's embedding table and sigma CMA-ES's initial
step size, so a first-generation prompt A z has entries of about alpha * std_hat. A candidate's
fitness is the cross-entropy (or multi-class hinge loss) of the gold label under the label
verbalizers' probabilities, the same scores the server answers a classification task with.

Two ways to score candidates, one search:

- `blackbox_tune(backbone, rows, ...)`: in-process, every candidate of a generation scored in
  shared batches with `modules.core.decode.score` (no gradients anywhere).
- `blackbox_tune_http(client, rows, ...)`: language-model-as-a-service: each candidate is uploaded as
  a `prompt` module under a scratch task, the training rows are sent to `POST /tasks/<scratch>/infer`
  and the loss is read from the returned label probabilities; the scratch task is deleted at the
  end. Without a local copy of the backbone, p0 is zero and `embedding_std` stands in for std_hat.

Both return a `prompt` module artifact to upload like any other.

Example::

    result = blackbox_tune(backbone, rows, BlackBoxOptions(intrinsic_dim=500, popsize=20, generations=100),
                           config={"num_virtual_tokens": 50}, template="Review: {input}\\nSentiment:",
                           labels={"negative": " negative", "positive": " positive"})
    open("sst2-bbt.zip", "wb").write(result.artifact)

    with Client(url, api_key=admin_key) as c:   # only forward passes through the service
        result = blackbox_tune_http(c, rows, BlackBoxOptions(generations=100), embedding_std=0.04,
                                    config={"num_virtual_tokens": 50}, labels=...)
"""

from __future__ import annotations

import math
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from modules.core.artifact import pack
from modules.core.backbone import Backbone
from modules.core.batch import Contribution
from modules.core.decode import ScoreItem, score
from modules.core.module import MANIFEST_FILE, WEIGHTS_FILE, BackboneRef, Manifest, TaskModule
from modules.kinds.prompt import PromptConfig, PromptModule
from modules.registry import kind_class
from modules.training.train import default_labels, evaluate


class Service(Protocol):
    """What black-box tuning over HTTP needs of a client (`clients.Client` is one)."""

    def backbone(self) -> dict: ...
    def list_tasks(self) -> list: ...          # items with a `name`
    def upload(self, name: str, artifact: bytes): ...
    def infer(self, name: str, inputs: list[str]): ...  # `.outputs[i].scores`
    def delete(self, name: str) -> None: ...


@dataclass
class BlackBoxOptions:
    intrinsic_dim: int = 500           # d, the size of z (the paper's default)
    popsize: int = 20                  # CMA-ES lambda, candidates per generation (the paper's default)
    generations: int = 400             # 400 x 20 = the paper's budget of 8,000 evaluations
    sigma: float = 1.0                 # CMA-ES's initial step size
    alpha: float = 1.0                 # scales the random projection (see the module docstring)
    bound: float | None = None         # box constraint |z_i| <= bound, none by default (as the paper)
    loss: Literal["ce", "hinge"] = "ce"
    seed: int = 0                      # the projection A and CMA-ES's samples
    batch_size: int = 32               # rows per backbone pass (in-process), per request (HTTP, at most 64)
    progress: bool = True

    def __post_init__(self):
        counts = {"intrinsic_dim": self.intrinsic_dim, "popsize": self.popsize, "generations": self.generations,
                  "batch_size": self.batch_size}
        for name, v in counts.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if self.intrinsic_dim < 1 or self.popsize < 2 or self.generations < 0:
            raise ValueError("need intrinsic_dim >= 1, popsize >= 2 and generations >= 0")
        if not (self.sigma > 0 and self.alpha > 0) or (self.bound is not None and self.bound <= 0):
            raise ValueError("sigma, alpha and bound must be positive")
        if self.loss not in ("ce", "hinge"):
            raise ValueError(f"loss must be 'ce' or 'hinge', got {self.loss!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass
class BlackBoxResult:
    prompt: torch.Tensor          # (P, H) the best prompt found, p0 + A z
    z: np.ndarray                 # (d,) its coordinates
    manifest: Manifest
    metrics: dict
    history: list[float] = field(default_factory=list)  # the best loss of each generation
    module: TaskModule | None = None                     # the loaded module (in-process only)

    @property
    def artifact(self) -> bytes:
        """The `prompt` module artifact, metrics included."""
        return prompt_artifact(self.manifest.model_copy(update={"metrics": self.metrics}), self.prompt)


def prompt_artifact(manifest: Manifest, prompt: torch.Tensor) -> bytes:
    """A `prompt` module artifact from a manifest and its (P, H) embeddings, no backbone needed:
    the same files `PromptModule.to_artifact()` writes."""
    from safetensors.torch import save

    if manifest.kind != PromptModule.kind or prompt.dim() != 2:
        raise ValueError("a prompt artifact needs a manifest of kind 'prompt' and a (P, H) tensor")
    return pack({MANIFEST_FILE: manifest.model_dump_json(indent=2).encode(),
                 WEIGHTS_FILE: save({"prompt.embeddings": prompt.detach().to("cpu", torch.float32).contiguous()})})


def random_projection(out_features: int, intrinsic_dim: int, std: float, seed: int) -> torch.Tensor:
    """A fixed (out_features, d) projection with entries drawn from N(0, std^2), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, intrinsic_dim, generator=g) * std


def projection_std(embedding_std: float, opts: BlackBoxOptions) -> float:
    """The reference's std of A: alpha * std_hat / (sqrt(d) * sigma)."""
    return opts.alpha * embedding_std / (math.sqrt(opts.intrinsic_dim) * opts.sigma)


def label_loss(logp: torch.Tensor, gold: torch.Tensor, loss: str) -> tuple[float, float]:
    """(loss, accuracy) of rows' label log-probabilities (N, K) against gold indices (N,)."""
    value = (torch.nn.functional.nll_loss(logp, gold) if loss == "ce"
             else torch.nn.functional.multi_margin_loss(logp, gold, margin=1.0))
    return float(value), float((logp.argmax(-1) == gold).float().mean())


# --- the search ----------------------------------------------------------------------------------

Objective = Callable[[list[torch.Tensor]], list[tuple[float, float]]]  # prompts -> (loss, accuracy) each


@dataclass
class SearchResult:
    """The best z a search found, its (loss, accuracy), those of z = 0, and the run's counts."""

    z: np.ndarray                 # (d,)
    loss: float
    accuracy: float
    initial_loss: float
    initial_accuracy: float
    history: list[float]          # the best loss of each generation
    generations: int
    evaluations: int              # candidates scored, z = 0 included
    stop: str                     # why CMA-ES stopped early ("" when it ran every generation)


def _cma(d: int, opts: BlackBoxOptions):
    with warnings.catch_warnings():  # cma warns when matplotlib is missing (plots only)
        warnings.simplefilter("ignore")
        import cma

    rng = np.random.default_rng(opts.seed)
    inopts = {"popsize": opts.popsize, "seed": np.nan, "randn": lambda *shape: rng.standard_normal(shape),
              "verbose": -9, "verb_log": 0, "verb_disp": 0, "maxiter": max(1, opts.generations)}
    if opts.bound is not None:
        inopts["bounds"] = [-opts.bound, opts.bound]
    return cma.CMAEvolutionStrategy(np.zeros(d), opts.sigma, inopts)


def cma_search(objective: Objective, p0: torch.Tensor, A: torch.Tensor, opts: BlackBoxOptions,
               desc: str = "bbt") -> SearchResult:
    """Minimise objective(p0 + A z) over z with CMA-ES from z = 0; the best z seen wins (z = 0,
    the initial prompt, included, so the result is never worse on the training rows)."""
    P, H = p0.shape
    d = A.shape[1]
    (loss0, acc0), = objective([p0])
    best = SearchResult(np.zeros(d), loss0, acc0, loss0, acc0, [], 0, 1, "")
    es = _cma(d, opts)
    bar = tqdm(range(opts.generations), desc=desc, disable=not opts.progress)
    for _ in bar:
        Z = np.asarray(es.ask())                                                  # (lambda, d)
        prompts = p0 + (torch.as_tensor(Z, dtype=torch.float32) @ A.T).view(-1, P, H)  # (lambda, P, H)
        scored = objective(list(prompts))
        losses = [s[0] for s in scored]
        es.tell(list(Z), losses)
        best.generations += 1
        best.evaluations += len(Z)
        i = int(np.argmin(losses))
        best.history.append(losses[i])
        if losses[i] < best.loss:
            best.z, best.loss, best.accuracy = Z[i].copy(), losses[i], scored[i][1]
        bar.set_postfix(loss=f"{losses[i]:.4f}", best=f"{best.loss:.4f}")
        stop = {k: v for k, v in es.stop().items() if k != "maxiter"}
        if stop:  # CMA-ES converged or stalled (flat fitness, tiny steps): more generations add nothing
            best.stop = ",".join(stop)
            break
    bar.close()
    return best


def _rows_and_gold(rows: list[dict], labels: dict[str, str]) -> torch.Tensor:
    names = list(labels)
    if not rows:
        raise ValueError("no training rows")
    gold = []
    for n, r in enumerate(rows):
        if "label" not in r:
            raise ValueError(f"row {n}: black-box tuning needs classification rows ({{'input', 'label'}})")
        if str(r["label"]) not in names:
            raise ValueError(f"row {n}: label {r['label']!r} is not one of the labels {names}")
        gold.append(names.index(str(r["label"])))
    return torch.tensor(gold)


def _metrics(s: SearchResult, opts: BlackBoxOptions, rows: list[dict], seconds: float) -> dict:
    return {"method": "black-box tuning (CMA-ES)", "intrinsic_dim": opts.intrinsic_dim, "popsize": opts.popsize,
            "generations": s.generations, "evaluations": s.evaluations, "sigma": opts.sigma, "loss": opts.loss,
            "seed": opts.seed, "train_rows": len(rows), "initial_loss": round(s.initial_loss, 4),
            "initial_accuracy": round(s.initial_accuracy, 4), "train_loss": round(s.loss, 4),
            "train_accuracy": round(s.accuracy, 4), "train_seconds": round(seconds, 1),
            **({"cma_stop": s.stop} if s.stop else {})}


def _labelled(rows: list[dict], manifest_fields: dict) -> dict:
    if manifest_fields.get("labels") is None:
        manifest_fields["labels"] = default_labels(rows)
    if not manifest_fields["labels"]:
        raise ValueError("black-box tuning needs classification rows ({'input', 'label'}) and labels")
    return manifest_fields


def _local_start(backbone: Backbone, config, manifest_fields: dict) -> tuple[TaskModule, torch.Tensor, float]:
    """The initial prompt module (its embeddings are p0) and the embedding table's std."""
    module = kind_class("prompt").new(backbone, config, **manifest_fields)
    p0 = module.embeddings.detach().to("cpu", torch.float32)                            # (P, H)
    std_hat = float(backbone.model.get_input_embeddings().weight.float().std())
    return module, p0, std_hat


# --- in-process ----------------------------------------------------------------------------------

class _LocalObjective:
    """Scores candidate prompts on the backbone: every (candidate, row) pair in shared batches."""

    def __init__(self, backbone: Backbone, module: TaskModule, rows: list[dict], opts: BlackBoxOptions):
        self.backbone, self.opts = backbone, opts
        self.ids = [module.encode(str(r["input"])) for r in rows]
        self.conts = module.label_ids
        self.gold = _rows_and_gold(rows, module.manifest.labels)

    @torch.inference_mode()
    def __call__(self, prompts: list[torch.Tensor]) -> list[tuple[float, float]]:
        on_device = [Contribution(prepend=p.to(self.backbone.device)) for p in prompts]
        items = [ScoreItem(ids, c, self.conts) for c in on_device for ids in self.ids]
        lls = []
        for i in range(0, len(items), self.opts.batch_size):
            lls += score(self.backbone, items[i:i + self.opts.batch_size])
        N = len(self.ids)
        logp = torch.log_softmax(torch.stack(lls).float().cpu(), -1).view(len(prompts), N, -1)  # (C, N, K)
        return [label_loss(logp[c], self.gold, self.opts.loss) for c in range(len(prompts))]


def blackbox_tune(backbone: Backbone, rows: list[dict], options: BlackBoxOptions | None = None,
                  eval_rows: list[dict] | None = None, config: dict | None = None,
                  **manifest_fields) -> BlackBoxResult:
    """Black-box-tune a `prompt` module on `rows` ({"input", "label"}) with forward passes only.

    `config` is the prompt kind's config (num_virtual_tokens, init of p0, its seed); the manifest
    fields (template, labels, ...) are those of `train_module`; labels default to the rows' labels."""
    opts = options or BlackBoxOptions()
    start = time.monotonic()
    module, p0, std_hat = _local_start(backbone, config, _labelled(rows, manifest_fields))
    A = random_projection(p0.numel(), opts.intrinsic_dim, projection_std(std_hat, opts), opts.seed)  # (P*H, d)
    found = cma_search(_LocalObjective(backbone, module, rows, opts), p0, A, opts)
    prompt = p0 + (A @ torch.as_tensor(found.z, dtype=torch.float32)).view_as(p0)         # (P, H)
    metrics = _metrics(found, opts, rows, time.monotonic() - start)
    final = kind_class("prompt").from_tensors(module.manifest, {"prompt.embeddings": prompt}, backbone)
    if eval_rows:
        metrics.update(evaluate(final, backbone, eval_rows, opts.batch_size, opts.progress))
    return BlackBoxResult(prompt, found.z, module.manifest, metrics, found.history, final)


# --- over HTTP (language-model-as-a-service) -----------------------------------------------------

class _HttpObjective:
    """Scores a candidate prompt through the service: upload it under the scratch task, infer."""

    def __init__(self, client: Service, task: str, manifest: Manifest, rows: list[dict], opts: BlackBoxOptions):
        self.client, self.task, self.manifest, self.opts = client, task, manifest, opts
        self.labels = list(manifest.labels)
        self.inputs = [str(r["input"]) for r in rows]
        self.gold = _rows_and_gold(rows, manifest.labels)

    def probabilities(self, prompt: torch.Tensor, inputs: list[str]) -> torch.Tensor:
        """The label probabilities the service answers for `inputs` under `prompt`. (N, K)"""
        self.client.upload(self.task, prompt_artifact(self.manifest, prompt))
        probs, step = [], min(self.opts.batch_size, 64)  # a request holds at most 64 inputs
        for i in range(0, len(inputs), step):
            for out in self.client.infer(self.task, inputs[i:i + step]).outputs:
                if out.scores is None:
                    raise RuntimeError(f"the service answered task {self.task!r} without label scores")
                probs.append([out.scores[name] for name in self.labels])
        return torch.tensor(probs, dtype=torch.float64)

    def __call__(self, prompts: list[torch.Tensor]) -> list[tuple[float, float]]:
        out = []
        for p in prompts:
            logp = self.probabilities(p, self.inputs).clamp_min(1e-300).log()  # (N, K)
            out.append(label_loss(logp, self.gold, self.opts.loss))
        return out


def blackbox_tune_http(client: Service, rows: list[dict], options: BlackBoxOptions | None = None,
                       eval_rows: list[dict] | None = None, config: dict | None = None, *,
                       backbone: Backbone | None = None, embedding_std: float | None = None,
                       scratch_task: str | None = None, **manifest_fields) -> BlackBoxResult:
    """Black-box tuning through the service's HTTP API (`client` needs the admin scope: it uploads).

    Each candidate becomes a `prompt` artifact uploaded as `scratch_task` (default: a fresh
    `bbt-<random>` name; an existing task is never overwritten), scored from the label
    probabilities `infer` returns on the rows; the scratch task is deleted at the end, also on
    errors. With `backbone` (a local copy of the served one, same fingerprint) p0 and std_hat come
    from it as in-process; without, p0 = 0 and `embedding_std` (required) is std_hat."""
    opts = options or BlackBoxOptions()
    start = time.monotonic()
    manifest_fields = _labelled(rows, manifest_fields)
    served = client.backbone()
    if backbone is not None:
        if backbone.info.fingerprint != served["fingerprint"]:
            raise ValueError(f"the local backbone (fingerprint {backbone.info.fingerprint}) is not the served one "
                             f"({served['name']}, fingerprint {served['fingerprint']})")
        module, p0, std_hat = _local_start(backbone, config, manifest_fields)
        manifest = module.manifest
    else:
        if embedding_std is None or not embedding_std > 0:
            raise ValueError("without a local backbone, pass embedding_std (the std of the served model's "
                             "embedding table; it scales the random projection)")
        cfg = PromptConfig(**(config or {}))
        if cfg.init != "vocab":
            raise ValueError(f"init={cfg.init!r} needs the backbone's embeddings; without one p0 is zero")
        ref = BackboneRef(**{k: served[k] for k in BackboneRef.model_fields})
        manifest = Manifest(kind="prompt", backbone=ref, config=cfg.model_dump(), **manifest_fields)
        p0, std_hat = torch.zeros(cfg.num_virtual_tokens, served["hidden_size"]), float(embedding_std)
    A = random_projection(p0.numel(), opts.intrinsic_dim, projection_std(std_hat, opts), opts.seed)  # (P*H, d)

    task = scratch_task or f"bbt-{uuid.uuid4().hex[:12]}"
    if task in {t.name for t in client.list_tasks()}:
        raise ValueError(f"task {task!r} already exists; black-box tuning needs a scratch task of its own")
    failed = True
    try:
        objective = _HttpObjective(client, task, manifest, rows, opts)
        found = cma_search(objective, p0, A, opts, desc="bbt (http)")
        prompt = p0 + (A @ torch.as_tensor(found.z, dtype=torch.float32)).view_as(p0)       # (P, H)
        metrics = _metrics(found, opts, rows, time.monotonic() - start)
        if eval_rows:
            gold = _rows_and_gold(eval_rows, manifest.labels)
            probs = objective.probabilities(prompt, [str(r["input"]) for r in eval_rows])
            metrics["eval_accuracy"] = round(float((probs.argmax(-1) == gold).double().mean()), 4)
            metrics["eval_rows"] = len(eval_rows)
        failed = False
    finally:
        try:
            if task in {t.name for t in client.list_tasks()}:
                client.delete(task)
        except Exception:
            if not failed:  # else the error that stopped the search is the one to see
                raise
    return BlackBoxResult(prompt, found.z, manifest, metrics, found.history)
