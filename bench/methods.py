"""Every module kind and trainer option on SST-2 and TREC with the same training budget.

Each method trains one module on the embedded backbone (SmolLM2-135M-Instruct) with the same
number of steps and batch size (`--steps`, `--batch-size`), the same seed and the same data order;
only the learning rate is the method's own (METHODS below). Reported per method and data set:

- accuracy on held-out rows (label scoring, as the server answers classification tasks);
- trainable parameters (the numbers the optimizer may change; Child-Tuning_D also reports the
  child network it actually updates; black-box tuning the size of z);
- artifact bytes (the zip the server stores);
- added latency of one request: the median time of a single-row request (probes + one scoring
  pass over the label verbalizers) through the module loaded from its artifact, minus the same
  for the zero-shot `template` module (same template and labels, no weights), measured
  interleaved in the same run.

Data (../shared/data): SST-2 trains on `stsa.binary.train` (6,920 rows) and is evaluated on a
seeded sample of `stsa.binary.dev`; TREC holds out a fixed seeded 500-row slice of
`TREC.train.all` (eval rows are taken from it) and trains on the other 4,952.

Black-box tuning (CMA-ES, forward passes only) gets a comparable forward budget: one gradient
step on B rows costs about 3 row-passes per row (forward + backward), so BBT may score
`--bbt-budget-x` x steps x B (row, candidate) pairs: candidates are scored on `--bbt-rows`
fixed training rows, `--bbt-popsize` per generation, generations = budget // (popsize x rows)
(at least 1).

Full fine-tuning (`full`, modules/training/full.py) trains every weight of a deep copy of the
backbone with the same loss, steps and data order; its bytes per task are a whole float32
safetensors checkpoint. Forgetting: each fully fine-tuned model is also scored zero-shot (the
`template` module's template and verbalizers) on the task it was not trained on and on AG News
(`--unseen-rows`, never trained on by anything here), against the frozen backbone's zero-shot
scores; after training, the served backbone's weights are hashed again and its zero-shot rows
re-scored (`frozen` in the JSON): modules cannot forget, and the run shows it.

Seeds (`--seeds 0,1,2`): each method is trained once per training seed (initialisation, data
order, Child-Tuning masks) on the same data split and eval rows (`--data-seed`); the table shows
mean ± sample standard deviation and the number of seeds. The first seed's run keeps its artifact
and is the one measured for latency. `template` is deterministic and runs once.

Few-shot (`--fewshot 16,64,256`): the `--fewshot-methods` (default prompt from a random start,
prompt from the PPT prompt of bench/ppt.py, lora, bitfit, ia3, full fine-tuning) train with the
same steps and batch on the first n rows of one seeded shuffle of each training set.

    .venv/bin/python bench/methods.py                                    # every method, default budget
    .venv/bin/python bench/methods.py --steps 2 --eval-rows 20 --methods template,prompt,lora   # smoke
    .venv/bin/python bench/methods.py --resume --methods full,lora --seeds 0,1,2 --fewshot 16,64,256 --readme
    .venv/bin/python bench/methods.py --table-only --readme              # the table from the JSON, into README.md

Writes bench/results/methods.json (after every run, so a cut-short run keeps what it did) and
prints a markdown table (`--readme`: also into README.md between its `methods` markers). Each
trained artifact is kept under `--artifact-dir`; `--resume` keeps the runs already in `--out` (of
every method, listed or not), runs only the listed (method, data set, seed) and few-shot runs
missing there and records itself under `resumed_by` (its command, machine, what it ran, and the
template base latency the added latency of the rows it measured is taken against). `--merge
OTHER.json` adds the runs of a parallel invocation (same budget, its own `--out`). Added latency
is measured on the modules loaded from their artifacts (`--no-latency`: keep the figures there
are); a resumed method whose artifact is gone is measured on a new module of the same kind and
config (the same shapes, so the same cost; its weights are not the trained ones, and the JSON
marks it `latency_from: "same config"`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from common import machine  # bench/common.py (the script's folder is on sys.path)

from modules.core.artifact import read_artifact
from modules.core.backbone import Backbone
from modules.core.decode import ScoreItem, score
from modules.core.stages import prepare
from modules.registry import kind_class, load_module
from modules.training.blackbox import BlackBoxOptions, blackbox_tune
from modules.training.full import checkpoint_bytes, train_full
from modules.training.train import TrainOptions, evaluate, train_module

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results" / "methods.json"
PPT = ROOT / "bench" / "results" / "ppt-prompt.zip"  # made by bench/ppt.py
README = ROOT / "README.md"

PROMPT = {"num_virtual_tokens": 16, "init": "labels"}
LORA = {"targets": ["q_proj", "v_proj"], "r": 8, "alpha": 16}
# The MAM adapter (He et al. 2022, the unified view): prefix tuning on attention plus a parallel
# adapter on the FFN scaled by 4, as one composed module.
MAM = {"parts": [{"kind": "prefix", "config": {"num_virtual_tokens": 8}},
                 {"kind": "adapter", "config": {"style": "parallel", "targets": ["down_proj"], "bottleneck": 8,
                                                "scale": 4.0}}]}
NULL_TEMPLATE = "{input}"  # a null prompt (Logan et al. 2022): the input, then the label's verbalizer

# name -> (kind, config, lr, Child-Tuning mode or None). The learning rates are set once per
# method family from the papers' usual ranges, raised for a short run; not tuned on these data.
METHODS: dict[str, tuple[str, dict | None, float, str | None]] = {
    "template": ("template", None, 0.0, None),                 # zero-shot baseline, no training
    "prompt": ("prompt", PROMPT, 3e-2, None),
    "p-tuning": ("prompt", {**PROMPT, "encoder": "lstm"}, 3e-2, None),  # folded into a plain prompt
    "prefix": ("prefix", {"num_virtual_tokens": 8}, 1e-2, None),
    "lora": ("lora", LORA, 3e-3, None),
    "bitfit": ("bitfit", {}, 5e-3, None),                       # every linear layer gets a bias
    "ia3": ("ia3", {}, 1e-2, None),                             # k, v, down_proj (the paper's)
    "adapter-houlsby": ("adapter", {"bottleneck": 8}, 2e-3, None),
    "adapter-parallel": ("adapter", {"style": "parallel", "bottleneck": 8, "scale": 4.0}, 2e-3, None),
    "said": ("said", {"d": 500, "targets": ["q_proj", "v_proj"]}, 2e-2, None),
    "sparse": ("sparse", {"targets": ["q_proj", "v_proj"], "reserve_p": 0.01}, 3e-4, None),
    "lora+ChildTuning_F": ("lora", LORA, 3e-3, "F"),
    "lora+ChildTuning_D": ("lora", LORA, 3e-3, "D"),
    "prompt+ChildTuning_F": ("prompt", PROMPT, 3e-2, "F"),
    "layernorm": ("layernorm", {}, 1e-2, None),                 # LayerNorm tuning: every norm's weights
    "mam": ("compose", MAM, 5e-3, None),
    "nullprompt+bitfit": ("bitfit", {}, 5e-3, None),            # template NULL_TEMPLATE, not the task's
    "blackbox": ("prompt", PROMPT, 0.0, None),                  # trained by blackbox_tune, not train_module
    # Full fine-tuning (modules/training/full.py): every backbone weight, on a deep copy of the
    # backbone, same loss, steps and data order; lr in the usual full fine-tuning range.
    "full": ("full", None, 5e-5, None),
    # Prompt tuning from a random start (sampled vocabulary embeddings, Lester et al.'s "random
    # vocab") and from the PPT prompt pre-trained on the P3 mix (bench/ppt.py): the few-shot block.
    "prompt-random": ("prompt", {"num_virtual_tokens": 16, "init": "vocab"}, 3e-2, None),
    "prompt-ppt": ("prompt", {"num_virtual_tokens": 16}, 3e-2, None),  # config and start from --ppt
}

TREC_LABELS = ["description", "entity", "abbreviation", "human", "location", "number"]  # 0..5 in the file
AGNEWS = {"world": " world", "sports": " sports", "business": " business", "tech": " technology"}  # classes 1-4


def agnews(rows: int, seed: int) -> dict:
    """AG News as a task neither SST-2 nor TREC training saw (forgetting only): a seeded sample of
    `rows` articles (title + description), scored zero-shot with a template."""
    import csv

    with open(DATA / "ag_news" / "train.csv", encoding="utf-8", newline="") as f:
        data = [{"input": f"{title}. {text}", "label": list(AGNEWS)[int(y) - 1]} for y, title, text in csv.reader(f)]
    random.Random(seed).shuffle(data)
    return {"eval": data[:rows], "template": "Article: {input}\nTopic:", "labels": AGNEWS}


def datasets(eval_rows: int, seed: int) -> dict[str, dict]:
    """{name: {train, eval, template, labels}}; rows are {"input", "label"}."""
    def parse(path: Path, names: list[str], encoding: str = "utf-8") -> list[dict]:
        rows = []
        for line in path.read_text(encoding=encoding).splitlines():
            y, x = line.split(" ", 1)
            rows.append({"input": x.strip(), "label": names[int(y)]})
        return rows

    sst_train = parse(DATA / "sst2" / "stsa.binary.train", ["negative", "positive"])
    sst_dev = parse(DATA / "sst2" / "stsa.binary.dev", ["negative", "positive"])
    random.Random(seed).shuffle(sst_dev)
    trec = parse(DATA / "trec" / "TREC.train.all", TREC_LABELS, "latin-1")  # one line has a Latin-1 byte
    order = list(range(len(trec)))
    random.Random(seed).shuffle(order)
    held = set(order[:500])
    return {
        "sst2": {"train": sst_train, "eval": sst_dev[:eval_rows], "template": "Review: {input}\nSentiment:",
                 "labels": {"negative": " negative", "positive": " positive"}},
        "trec": {"train": [r for i, r in enumerate(trec) if i not in held],
                 "eval": [trec[i] for i in order[:500]][:eval_rows],
                 "template": "Question: {input}\nQuestion type:", "labels": {n: f" {n}" for n in TREC_LABELS}},
    }


def run_method(name: str, backbone: Backbone, ds: dict, args, seed: int = 0, train: list[dict] | None = None,
               others: dict[str, dict] | None = None) -> tuple[bytes | None, dict]:
    """Train (or not) one method on one data set (`train`: these rows instead of the data set's);
    its artifact (None for full fine-tuning: a whole model) and metrics. Full fine-tuning also
    scores the tuned model zero-shot on each of `others` (data sets it was not trained on):
    metrics["other_tasks"]."""
    kind, config, lr, mode = METHODS[name]
    train = ds["train"] if train is None else train
    fields = {"template": NULL_TEMPLATE if name.startswith("nullprompt") else ds["template"], "labels": ds["labels"]}
    start = time.monotonic()
    if name == "template":
        module = kind_class("template").new(backbone, **fields)
        metrics = {"trainable_params": 0, **evaluate(module, backbone, ds["eval"], 32)}
        return module.to_artifact(metrics=metrics), metrics
    if name == "blackbox":
        budget = args.bbt_budget_x * args.steps * args.batch_size
        gens = max(1, int(budget // (args.bbt_popsize * args.bbt_rows)))
        rows = random.Random(seed).sample(train, args.bbt_rows)
        opts = BlackBoxOptions(intrinsic_dim=args.bbt_dim, popsize=args.bbt_popsize, generations=gens,
                               seed=seed, batch_size=32, progress=args.progress)
        result = blackbox_tune(backbone, rows, opts, eval_rows=ds["eval"], config=config, **fields)
        metrics = {**result.metrics, "trainable_params": args.bbt_dim, "row_passes": result.metrics["evaluations"] * len(rows)}
        return result.artifact, metrics
    opts = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed,
                        progress=args.progress, child_tuning=mode, fisher_batches=args.fisher_batches)
    if name == "full":
        result = train_full(backbone, train, opts, eval_rows=ds["eval"], **fields)
        metrics = dict(result.metrics)
        metrics["other_tasks"] = {
            o: evaluate(kind_class("template").new(result.backbone, template=d["template"], labels=d["labels"]),
                        result.backbone, d["eval"], 32)["eval_accuracy"] for o, d in (others or {}).items()}
        metrics["wall_seconds"] = round(time.monotonic() - start, 1)
        return None, metrics
    init = None
    if name == "prompt-ppt":
        init = load_module(read_artifact(Path(args.ppt).read_bytes()), backbone)
    result = train_module(backbone, kind, train, opts, eval_rows=ds["eval"], config=config, init=init, **fields)
    metrics = dict(result.metrics)
    metrics["wall_seconds"] = round(time.monotonic() - start, 1)
    return result.artifact, metrics


def _fisher_nnz(backbone: Backbone, row: dict) -> dict[str, int]:
    """A sparse module's nnz spread evenly over its target layers (for a latency stand-in)."""
    from modules.core.targets import select_linears

    fisher = row["fisher"]
    keys = list(select_linears(backbone, fisher["targets"], fisher["layers"]))
    return {k: max(1, fisher["selected"] // len(keys)) for k in keys}


@torch.inference_mode()
def added_latency(backbone: Backbone, modules: dict[str, object], texts: list[str], repeats: int) -> dict[str, float]:
    """Median ms of a single-row request per module, minus the template module's; interleaved."""
    times: dict[str, list[float]] = {n: [] for n in modules}

    def once(m, t):
        begin = time.perf_counter()
        row = prepare(backbone, [(m, m.encode(t))])[0]
        score(backbone, [ScoreItem(row.ids, row.contribution, m.label_ids)])
        return time.perf_counter() - begin

    for m in modules.values():  # warm-up: dense deltas built once, as a served module's are
        once(m, texts[0])
    for _ in range(repeats):
        for t in texts:
            for n, m in modules.items():
                times[n].append(once(m, t))
    med = {n: 1000 * statistics.median(v) for n, v in times.items()}
    base = med["template"]
    return {n: round(v - base, 2) for n, v in med.items()} | {"_base_ms": round(base, 2)}


def seed_runs(row: dict) -> dict[str, dict]:
    """{seed: run} of one (method, data set) row; a row from before seeds were recorded is seed 0's."""
    return row.get("by_seed") or {"0": {"eval_accuracy": row["eval_accuracy"]}}


def mean_sd(values: list[float]) -> str:
    """"0.855" for one value, "0.855 ± 0.012" (sample standard deviation) for several."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _what(name: str, kind: str, mode: str | None) -> str:
    return {"template": "template (zero-shot)", "blackbox": "prompt by CMA-ES (BBT)", "layernorm": "LayerNorm tuning",
            "mam": "MAM adapter: prefix + parallel FFN adapter (x4), composed",
            "nullprompt+bitfit": "bitfit, null prompt (template `{input}`)",
            "p-tuning": "prompt by P-tuning (LSTM encoder, folded)",
            "full": "**full fine-tuning** (every backbone weight)",
            "prompt-random": "prompt, random init (sampled vocabulary)",
            "prompt-ppt": "prompt, PPT init (pre-trained on the P3 mix)"}.get(
        name, kind + (f" + Child-Tuning_{mode}" if mode else "") + (" (Fisher mask)" if kind == "sparse" else ""))


def table(out: dict) -> str:
    r = out["results"]
    b = out["budget"]
    lines = [f"Backbone {out['backbone']} ({out['device']}); {b['steps']} steps x batch {b['batch_size']}; data split "
             f"seed {b['data_seed']}; eval rows: SST-2 {out['datasets'].get('sst2', {}).get('eval_rows')} (dev), TREC "
             f"{out['datasets'].get('trec', {}).get('eval_rows')} (held-out slice); {out['machine']}. Accuracy: mean ± sample "
             f"standard deviation over the training seeds in the `seeds` column (the same eval rows for every seed); "
             f"one figure where one seed ran.", "",
             "| method | kind / option | lr | SST-2 acc | TREC acc | seeds | trainable params | bytes per task | "
             "added latency ms (SST-2 / TREC) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(r, key=lambda n: list(METHODS).index(n) if n in METHODS else len(METHODS)):
        spec = out["methods"][name]  # as it ran
        kind, lr, mode = spec["kind"], spec["lr"], spec["child_tuning"]
        row = r[name]
        s, t = row.get("sst2", {}), row.get("trec", {})
        any_ = s or t
        acc = lambda d: mean_sd([v["eval_accuracy"] for v in seed_runs(d).values()]) if d else "-"  # noqa: E731
        n = sorted({len(seed_runs(d)) for d in (s, t) if d})
        seeds = "deterministic" if name == "template" else "/".join(map(str, n))
        params = f"{any_.get('trainable_params', 0):,}"
        if "child_params" in any_:
            params += f" ({any_['child_params']:,} in the D mask)"
        if name == "blackbox":
            params += f" (z; prompt {any_.get('prompt_params', 0):,})"
        if name == "full":
            lat = "- (a model of its own)"
        else:
            lat = " / ".join(f"{d['added_latency_ms']:+.1f}{'*' if 'latency_from' in d else ''}"
                             if "added_latency_ms" in d else "-" for d in (s, t))
        size = f"{any_.get('artifact_bytes', 0):,}" + (" (fp32 safetensors)" if name == "full" else "")
        lines.append(f"| {name} | {_what(name, kind, mode)} | {lr if lr else '-'} | {acc(s)} | {acc(t)} | {seeds} | "
                     f"{params} | {size} | {lat} |")
    if any("latency_from" in d for row in r.values() for d in row.values()):
        lines += ["", "\\* latency measured on a new module of the same kind and config (the same shapes and cost; "
                      "the trained artifact was not kept by the run that trained it)."]
    if "blackbox" in r:
        bb = r["blackbox"].get("sst2") or r["blackbox"].get("trec")
        fisher = f"Child-Tuning_D and sparse {b['fisher_batches'] * b['batch_size']:,} more for the Fisher estimate"
        warm = next((d["fisher_warmup_steps"] for row in r.values() for d in row.values()
                     if "fisher_warmup_steps" in d), 0)
        if warm:
            fisher += f", Child-Tuning_D {warm * b['batch_size']:,} more for the warm-up before it"
        lines += ["", f"Black-box tuning: d={bb['intrinsic_dim']}, popsize {bb['popsize']}, {bb['generations']} "
                      f"generation(s), {bb['evaluations']} candidates scored on {bb['train_rows']} training rows "
                      f"({bb['row_passes']:,} row passes, no backward; the gradient methods make "
                      f"{b['steps'] * b['batch_size']:,} forward + backward row passes, {fisher})."]
    lines += forgetting_table(out)
    lines += fewshot_table(out)
    for run in out.get("resumed_by", []):
        base = " / ".join(f"{ms:.0f}" for ms in run.get("base_latency_ms", {}).values())
        trained = _compact(run["trained"]) or "none"
        lat = (f"; the added latency of the rows it ran is against the template in that run ({base} ms)" if base
               else "; no latency measured")
        lines += ["", f"Re-run later ({run['machine']}): {trained}{lat}."]
    return "\n".join(lines)


def _compact(trained: list[str]) -> str:
    """["lora/sst2/seed 1", "lora/sst2/seed 2", "lora/trec/n=16/seed 0"] -> "lora (sst2 seed 1, 2; trec n=16 seed 0)";
    an entry without slashes (an older record) stays as it is."""
    groups: dict[str, dict[str, list[str]]] = {}
    for t in trained:
        parts = t.split("/")
        if len(parts) == 1:
            groups.setdefault(t, {})
            continue
        name, rest, last = parts[0], " ".join(parts[1:-1]), parts[-1].removeprefix("seed ")
        groups.setdefault(name, {}).setdefault(rest, []).append(last)
    return ", ".join(name + (" (" + "; ".join(f"{k} seed {', '.join(v)}" for k, v in g.items()) + ")" if g else "")
                     for name, g in groups.items())


def forgetting_table(out: dict) -> list[str]:
    """The fully fine-tuned models on tasks they were not trained on, against the frozen backbone."""
    r, frozen = out["results"], out.get("frozen", {})
    if "full" not in r or "template" not in r:
        return []
    tasks = [d for d in ("sst2", "trec") if d in r["template"]]
    unseen = out.get("unseen", {})
    names = {"sst2": "SST-2", "trec": "TREC", **{u: v["name"] for u, v in unseen.items()}}
    cols = tasks + list(unseen)
    lines = ["", "**Forgetting.** Zero-shot accuracy (the `template` rows: each task's template and verbalizers, no "
                 "module) of the backbone each setup leaves behind, on every task; *italic* = the task it was "
                 "trained on (its fine-tuned score, for reference). "
                 + ", ".join(f"{names[u]}: {v['rows']} rows, template `{json.dumps(v['template'])}`, verbalizers "
                             f"{', '.join(repr(x) for x in v['labels'].values())}, never trained on"
                             for u, v in unseen.items()) + ".", "",
             "| backbone | " + " | ".join(names[c] for c in cols) + " | seeds |", "|---|" + "---:|" * (len(cols) + 1)]
    zero = {d: r["template"][d]["eval_accuracy"] for d in tasks} | {u: v["frozen"] for u, v in unseen.items()}
    lines.append("| frozen (before any training) | " + " | ".join(f"{zero[c]:.3f}" for c in cols) + " | - |")
    after = frozen.get("template_after_training", {})
    if after:
        same = frozen.get("weights_sha256_before") == frozen.get("weights_sha256_after")
        lines.append(f"| frozen, re-scored after training {len(frozen.get('after', []))} modules in the same process "
                     f"(weights {'bit-identical' if same else 'CHANGED'}) | "
                     + " | ".join(f"{after[c]:.3f}" if c in after else "-" for c in cols) + " | - |")
    for d in tasks:
        row = r["full"].get(d)
        if not row:
            continue
        runs = seed_runs(row)
        cells = []
        for c in cols:
            if c == d:
                cells.append(f"*{mean_sd([v['eval_accuracy'] for v in runs.values()])}*")
            else:
                vals = [v["other_tasks"][c] for v in runs.values() if c in v.get("other_tasks", {})]
                cells.append(mean_sd(vals) + (f" ({statistics.mean(vals) - zero[c]:+.3f})" if vals else ""))
        lines.append(f"| fully fine-tuned on {names[d]} | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines


def fewshot_table(out: dict) -> list[str]:
    fs = out.get("fewshot")
    if not fs:
        return []
    sizes = sorted({int(n) for m in fs.values() for d in m.values() for n in d}, key=int)
    tasks = [d for d in ("sst2", "trec") if any(d in m for m in fs.values())]
    names = {"sst2": "SST-2", "trec": "TREC"}
    spec = out["fewshot_budget"]
    seeds = sorted({s for m in fs.values() for d in m.values() for runs in d.values() for s in runs}, key=int)
    counts = {len(runs) for m in fs.values() for d in m.values() for runs in d.values()}
    said = (f"training seeds {', '.join(seeds)} in every cell (mean ± sample standard deviation)" if counts == {len(seeds)}
            else f"training seeds {', '.join(seeds)}, of which {min(counts)} to {max(counts)} ran per cell (mean ± "
                 f"sample standard deviation where more than one)")
    lines = ["", f"**Few-shot.** {spec['steps']} steps x batch {spec['batch_size']} (as above) on the first n rows of "
                 f"one seeded shuffle of each training set (16 ⊂ 64 ⊂ 256; the same rows for every method and seed), "
                 f"scored on the first {spec['eval_rows']} eval rows above; {said}. `n=all` is the method's row of "
                 f"the table above (the whole training set, {spec['steps'] * spec['batch_size']} rows seen once, "
                 f"scored on all its eval rows, its seeds).", "",
             "| method | " + " | ".join(f"{names[d]} n={n}" for d in tasks for n in sizes + ["all"]) + " |",
             "|---|" + "---:|" * (len(tasks) * (len(sizes) + 1))]
    for name in [m for m in METHODS if m in fs]:
        cells = []
        for d in tasks:
            for n in sizes:
                runs = fs[name].get(d, {}).get(str(n), {})
                cells.append(mean_sd([v["eval_accuracy"] for v in runs.values()]))
            full = out["results"].get(name, {}).get(d)
            cells.append(mean_sd([v["eval_accuracy"] for v in seed_runs(full).values()]) if full else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def weights_digest(backbone: Backbone) -> str:
    """sha256 of every weight of the backbone, bit for bit."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(backbone.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fewshot_rows(train: list[dict], n: int, seed: int) -> list[dict]:
    """The first n rows of one seeded shuffle of `train` (so smaller sets are inside larger ones)."""
    order = list(range(len(train)))
    random.Random(f"fewshot/{seed}").shuffle(order)
    return [train[i] for i in order[:n]]


README_BEGIN = "<!-- methods: from bench/results/methods.json (bench/methods.py --readme) -->"
README_END = "<!-- /methods -->"


def write_readme(text: str, path: Path = README) -> None:
    """Replace the README's methods table (between its markers) with `text`."""
    doc = path.read_text(encoding="utf-8")
    if README_BEGIN not in doc or README_END not in doc:
        raise SystemExit(f"{path}: the markers {README_BEGIN!r} and {README_END!r} are missing")
    head, rest = doc.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{text}\n{README_END}{tail}", encoding="utf-8")


def _migrate(out: dict) -> dict:
    """A results file from before seeds and few-shot runs: its one seed was 0 and also the data split's."""
    if "seed" in out["budget"]:
        out["budget"]["data_seed"] = out["budget"].pop("seed")
    return out


def merge(into: dict, other: dict) -> None:
    """Add the runs of `other` (another results file of the same budget and data, e.g. from a
    process run in parallel) that `into` lacks; its run records go under `resumed_by`."""
    for key in ("results", "fewshot"):
        for name, per in other.get(key, {}).items():
            for dname, row in per.items():
                mine = into.setdefault(key, {}).setdefault(name, {}).setdefault(dname, {})
                if key == "results":
                    if not mine:
                        mine.update(row)
                    else:
                        for seed, run in seed_runs(row).items():
                            mine.setdefault("by_seed", seed_runs(mine)).setdefault(seed, run)
                else:
                    for n, runs in row.items():
                        for seed, run in runs.items():
                            mine.setdefault(n, {}).setdefault(seed, run)
    into["methods"] = {**other.get("methods", {}), **into["methods"]}
    for k in ("fewshot_budget", "unseen", "frozen"):
        if k in other and k not in into:
            into[k] = other[k]
    runs = other.get("resumed_by", []) if "trained" not in other else \
        [{"command": other["command"], "machine": other["machine"], "trained": other["trained"]}]
    into["resumed_by"] = into.get("resumed_by", []) + [r for r in runs if r not in into.get("resumed_by", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps per method (default 40)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=200, help="evaluation rows per data set (default 200)")
    ap.add_argument("--methods", default=",".join(m for m in METHODS if not m.startswith("prompt-")),
                    help="comma list (default: all but the few-shot prompt starts): " + ", ".join(METHODS))
    ap.add_argument("--datasets", default="sst2,trec")
    ap.add_argument("--seeds", default="0", help="training seeds, comma list (default 0); the first one's run keeps "
                                                 "its artifact and is the one measured for latency")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the eval rows and TREC's held-out slice")
    ap.add_argument("--fewshot", default="", help="few-shot training set sizes, e.g. 16,64,256 (default: none)")
    ap.add_argument("--fewshot-methods", default="prompt-random,prompt-ppt,lora,bitfit,ia3,full")
    ap.add_argument("--fewshot-seeds", default="0")
    ap.add_argument("--fewshot-eval-rows", type=int, default=0, help="eval rows of the few-shot runs (default: all)")
    ap.add_argument("--ppt", default=str(PPT), help="the PPT prompt artifact (bench/ppt.py) for prompt-ppt")
    ap.add_argument("--unseen-rows", type=int, default=200, help="AG News rows for the forgetting check (0: none)")
    ap.add_argument("--fisher-batches", type=int, default=4, help="Child-Tuning_D / sparse Fisher batches (default 4)")
    ap.add_argument("--bbt-dim", type=int, default=500, help="BBT intrinsic dimension d (default 500)")
    ap.add_argument("--bbt-popsize", type=int, default=20)
    ap.add_argument("--bbt-rows", type=int, default=16, help="fixed training rows BBT scores candidates on")
    ap.add_argument("--bbt-budget-x", type=float, default=3.0,
                    help="BBT row passes = this x steps x batch size (default 3: a forward + backward)")
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--no-latency", action="store_true", help="measure no latency (keep the figures already in --out)")
    ap.add_argument("--frozen-check", choices=["auto", "yes", "no"], default="auto",
                    help="re-score the zero-shot template rows and hash the backbone's weights after training "
                         "(auto: when this run trained something)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--artifact-dir", default=str(Path.home() / ".cache" / "frozenlm" / "bench" / "methods"),
                    help="where each method's trained artifact is kept")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results in --out, run only the (method, data set, seed) runs missing there")
    ap.add_argument("--merge", action="append", default=[],
                    help="results file of a parallel run (same budget) whose runs to add to --out, then exit")
    ap.add_argument("--table-only", action="store_true", help="print the table from --out and exit")
    ap.add_argument("--readme", action="store_true", help="also write the table into README.md between its markers")
    args = ap.parse_args()
    if args.merge:
        out = _migrate(json.loads(Path(args.out).read_text()))
        for path in args.merge:
            other = _migrate(json.loads(Path(path).read_text()))
            if other["budget"] != out["budget"] or other["datasets"] != out["datasets"]:
                raise SystemExit(f"--merge: {path} has another budget or other data")
            merge(out, other)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    if args.table_only or args.merge:
        text = table(_migrate(json.loads(Path(args.out).read_text())))
        print(text)
        if args.readme:
            write_readme(text)
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    fs_methods = [m.strip() for m in args.fewshot_methods.split(",") if m.strip()] if args.fewshot else []
    unknown = set(methods + fs_methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if "template" not in methods:
        methods.insert(0, "template")  # the latency baseline and the zero-shot scores
    seeds = [int(x) for x in args.seeds.split(",")]
    fs_sizes = [int(x) for x in args.fewshot.split(",") if x.strip()]
    fs_seeds = [int(x) for x in args.fewshot_seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = Backbone.load()
    data = {k: v for k, v in datasets(args.eval_rows, args.data_seed).items() if k in args.datasets.split(",")}
    out = {"backbone": backbone.name, "device": str(backbone.device),
           "machine": machine(backbone),
           "command": "bench/methods.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                   if k not in ("progress", "out", "table_only", "merge", "readme")),
           "budget": {"steps": args.steps, "batch_size": args.batch_size, "data_seed": args.data_seed,
                      "fisher_batches": args.fisher_batches},
           "datasets": {k: {"train_rows": len(v["train"]), "eval_rows": len(v["eval"]), "template": v["template"],
                            "labels": v["labels"]} for k, v in data.items()},
           "methods": {m: {"kind": METHODS[m][0], "config": METHODS[m][1], "lr": METHODS[m][2],
                           "child_tuning": METHODS[m][3]} for m in dict.fromkeys(methods + fs_methods)},
           "results": {}}
    run = out  # where this invocation's own facts go (its template's base latency, what it trained)
    run["trained"] = []
    if args.resume and Path(args.out).is_file():
        previous = _migrate(json.loads(Path(args.out).read_text()))
        if previous["budget"] != out["budget"] or previous["datasets"] != out["datasets"]:
            raise SystemExit(f"--resume: {args.out} was made with another budget or other data; run without --resume")
        # every earlier run is kept; this invocation runs what is missing there and is listed apart
        run = {"command": out["command"], "machine": out["machine"], "trained": []}
        keep = {k: previous[k] for k in ("fewshot", "fewshot_budget", "unseen", "frozen", "base_latency_ms")
                if k in previous}
        out.update(results=previous["results"], methods={**previous["methods"], **out["methods"]},
                   command=previous["command"], machine=previous["machine"], **keep,
                   resumed_by=previous.get("resumed_by", []) + [run])
        out.pop("trained", None)
    save = lambda: Path(args.out).write_text(json.dumps(out, indent=2) + "\n")  # noqa: E731
    artifacts = Path(args.artifact_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    digest_before = weights_digest(backbone)
    unseen = {}
    if args.unseen_rows and ("full" in methods + fs_methods or args.frozen_check != "no"):
        ag = agnews(args.unseen_rows, args.data_seed)
        unseen = {"agnews": ag}
        if "agnews" not in out.get("unseen", {}):
            module = kind_class("template").new(backbone, template=ag["template"], labels=ag["labels"])
            out.setdefault("unseen", {})["agnews"] = {
                "name": "AG News", "rows": len(ag["eval"]), "template": ag["template"], "labels": ag["labels"],
                "frozen": evaluate(module, backbone, ag["eval"], 32)["eval_accuracy"]}

    trained: dict[str, dict] = {d: {} for d in data}  # this run's first-seed modules, for latency
    for name in methods:
        for dname, ds in data.items():
            others = {o: d for o, d in data.items() if o != dname} | unseen
            for seed in seeds[:1] if name == "template" else seeds:  # the template is deterministic
                have = out["results"].get(name, {}).get(dname)
                if have and str(seed) in seed_runs(have):
                    continue
                t0 = time.monotonic()
                blob, metrics = run_method(name, backbone, ds, args, seed, others=others)
                short = {"eval_accuracy": metrics.get("eval_accuracy"), "seconds": round(time.monotonic() - t0, 1),
                         **{k: metrics[k] for k in ("train_loss", "train_seconds", "other_tasks") if k in metrics}}
                if have:  # another seed of a method that has its row
                    have.setdefault("by_seed", seed_runs(have))[str(seed)] = short
                else:
                    row = {"eval_accuracy": metrics.get("eval_accuracy"), "trainable_params": metrics["trainable_params"],
                           "artifact_bytes": len(blob) if blob is not None else checkpoint_bytes(backbone),
                           "seconds": short["seconds"],
                           **{k: metrics[k] for k in ("child_params", "fisher_warmup_steps", "train_loss",
                                                      "train_seconds", "initial_loss",
                                                      "intrinsic_dim", "popsize", "generations", "evaluations",
                                                      "train_rows", "row_passes", "fisher", "other_tasks")
                              if k in metrics},
                           "by_seed": {str(seed): short}}
                    if blob is not None:
                        (artifacts / f"{name}-{dname}.zip").write_bytes(blob)
                        module = load_module(read_artifact(blob), backbone)
                        trained[dname][name] = module
                        if name == "blackbox":
                            row["prompt_params"] = int(module.embeddings.numel())
                    out["results"].setdefault(name, {})[dname] = row
                run["trained"].append(f"{name}/{dname}/seed {seed}")
                print(f"{name:22} {dname:5} seed={seed} acc={short['eval_accuracy']} "
                      f"{short.get('other_tasks', '')} {short['seconds']}s", flush=True)
                save()

    if fs_sizes:
        spec = {"steps": args.steps, "batch_size": args.batch_size, "eval_rows": args.fewshot_eval_rows or args.eval_rows}
        if out.setdefault("fewshot_budget", spec) != spec:
            raise SystemExit(f"--fewshot: {args.out} holds few-shot runs made with {out['fewshot_budget']}")
        for name in fs_methods:
            for dname, ds in data.items():
                small = {**ds, "eval": ds["eval"][:spec["eval_rows"]]}
                for n in fs_sizes:
                    for seed in fs_seeds:
                        runs = out.setdefault("fewshot", {}).setdefault(name, {}).setdefault(dname, {}).setdefault(str(n), {})
                        if str(seed) in runs:
                            continue
                        t0 = time.monotonic()
                        _, metrics = run_method(name, backbone, small, args, seed,
                                                train=fewshot_rows(ds["train"], n, args.data_seed))
                        runs[str(seed)] = {"eval_accuracy": metrics["eval_accuracy"],
                                           "train_loss": metrics.get("train_loss"),
                                           "seconds": round(time.monotonic() - t0, 1)}
                        run["trained"].append(f"{name}/{dname}/n={n}/seed {seed}")
                        print(f"few-shot {name:16} {dname:5} n={n:<4} seed={seed} acc={metrics['eval_accuracy']} "
                              f"{runs[str(seed)]['seconds']}s", flush=True)
                        save()

    if args.frozen_check == "yes" or (args.frozen_check == "auto" and run["trained"]):  # modules cannot forget: the backbone is bit-identical, so is every zero-shot score
        digest_after = weights_digest(backbone)
        after = {}
        for dname, ds in data.items():
            module = kind_class("template").new(backbone, template=ds["template"], labels=ds["labels"])
            after[dname] = evaluate(module, backbone, ds["eval"], 32)["eval_accuracy"]
        for u, ds in unseen.items():
            module = kind_class("template").new(backbone, template=ds["template"], labels=ds["labels"])
            after[u] = evaluate(module, backbone, ds["eval"], 32)["eval_accuracy"]
        out["frozen"] = {"weights_sha256_before": digest_before, "weights_sha256_after": digest_after,
                         "template_after_training": after,
                         "after": run["trained"], "command": run["command"]}
        save()
    if not args.no_latency:
        loaded: dict[str, dict] = {d: {} for d in data}
        for name in [m for m in methods if m != "full"]:
            for dname, ds in data.items():
                if name in trained[dname]:
                    loaded[dname][name] = trained[dname][name]
                    continue
                saved = artifacts / f"{name}-{dname}.zip"
                if saved.is_file():
                    loaded[dname][name] = load_module(read_artifact(saved.read_bytes()), backbone)
                elif name == "template":  # no weights: a new one is the same module
                    loaded[dname][name] = kind_class("template").new(backbone, template=ds["template"],
                                                                     labels=ds["labels"])
                else:
                    kind, config = METHODS[name][0], METHODS[name][1]
                    if name == "sparse":  # trained positions are gone: as many, drawn at random
                        config = {"nnz": _fisher_nnz(backbone, out["results"][name][dname])}
                    loaded[dname][name] = kind_class(kind).new(backbone, config, template=ds["template"],
                                                               labels=ds["labels"])
                    out["results"][name][dname]["latency_from"] = "same config"
        for dname, ds in data.items():
            texts = [r["input"] for r in ds["eval"][:3]]
            lat = added_latency(backbone, loaded[dname], texts, args.latency_repeats)
            run.setdefault("base_latency_ms", {})[dname] = lat.pop("_base_ms")
            for name, ms in lat.items():
                out["results"][name][dname]["added_latency_ms"] = ms
        save()
    print()
    text = table(out)
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
