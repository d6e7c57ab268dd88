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

    .venv/bin/python bench/methods.py                                    # every method, default budget
    .venv/bin/python bench/methods.py --steps 2 --eval-rows 20 --methods template,prompt,lora   # smoke
    .venv/bin/python bench/methods.py --table-only                       # reprint the table from the JSON

Writes bench/results/methods.json (after every method, so a cut-short run keeps what it did) and
prints a markdown table. Each trained artifact is kept under `--artifact-dir`; `--resume` keeps the
results already in `--out` (of every method, listed or not), trains only the listed methods missing
there and records itself under `resumed_by` (its command, machine and template base latency, which
the added latency of the rows it measured is taken against). Added latency is measured on
the modules loaded from their artifacts; a resumed method whose artifact is gone is measured on a
new module of the same kind and config (the same shapes, so the same cost; its weights are not the
trained ones, and the JSON marks it `latency_from: "same config"`).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from modules.core.artifact import read_artifact
from modules.core.backbone import Backbone
from modules.core.decode import ScoreItem, score
from modules.core.stages import prepare
from modules.registry import kind_class, load_module
from modules.training.blackbox import BlackBoxOptions, blackbox_tune
from modules.training.train import TrainOptions, evaluate, train_module

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results" / "methods.json"

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
}

TREC_LABELS = ["description", "entity", "abbreviation", "human", "location", "number"]  # 0..5 in the file


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


def run_method(name: str, backbone: Backbone, ds: dict, args) -> tuple[bytes, dict]:
    """Train (or not) one method on one data set: its artifact and metrics."""
    kind, config, lr, mode = METHODS[name]
    fields = {"template": NULL_TEMPLATE if name.startswith("nullprompt") else ds["template"], "labels": ds["labels"]}
    start = time.monotonic()
    if name == "template":
        module = kind_class("template").new(backbone, **fields)
        metrics = {"trainable_params": 0, **evaluate(module, backbone, ds["eval"], 32)}
        return module.to_artifact(metrics=metrics), metrics
    if name == "blackbox":
        budget = args.bbt_budget_x * args.steps * args.batch_size
        gens = max(1, int(budget // (args.bbt_popsize * args.bbt_rows)))
        rows = random.Random(args.seed).sample(ds["train"], args.bbt_rows)
        opts = BlackBoxOptions(intrinsic_dim=args.bbt_dim, popsize=args.bbt_popsize, generations=gens,
                               seed=args.seed, batch_size=32, progress=args.progress)
        result = blackbox_tune(backbone, rows, opts, eval_rows=ds["eval"], config=config, **fields)
        metrics = {**result.metrics, "trainable_params": args.bbt_dim, "row_passes": result.metrics["evaluations"] * len(rows)}
        return result.artifact, metrics
    opts = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
                        progress=args.progress, child_tuning=mode, fisher_batches=args.fisher_batches)
    result = train_module(backbone, kind, ds["train"], opts, eval_rows=ds["eval"], config=config, **fields)
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


def table(out: dict) -> str:
    r = out["results"]
    b = out["budget"]
    lines = [f"Backbone {out['backbone']} ({out['device']}); {b['steps']} steps x batch {b['batch_size']}, seed "
             f"{b['seed']}; eval rows: SST-2 {out['datasets']['sst2']['eval_rows']} (dev), TREC "
             f"{out['datasets']['trec']['eval_rows']} (held-out slice); {out['machine']}.", "",
             "| method | kind / option | lr | SST-2 acc | TREC acc | trainable params | artifact bytes | "
             "added latency ms (SST-2 / TREC) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in sorted(r, key=lambda n: list(METHODS).index(n) if n in METHODS else len(METHODS)):
        spec = out["methods"][name]  # as it ran
        kind, lr, mode = spec["kind"], spec["lr"], spec["child_tuning"]
        row = r[name]
        s, t = row.get("sst2", {}), row.get("trec", {})
        any_ = s or t
        acc = lambda d: f"{d['eval_accuracy']:.3f}" if "eval_accuracy" in d else "-"  # noqa: E731
        what = {"template": "template (zero-shot)", "blackbox": "prompt by CMA-ES (BBT)", "layernorm": "LayerNorm tuning",
                "mam": "MAM adapter: prefix + parallel FFN adapter (x4), composed",
                "nullprompt+bitfit": "bitfit, null prompt (template `{input}`)",
                "p-tuning": "prompt by P-tuning (LSTM encoder, folded)"}.get(
            name, kind + (f" + Child-Tuning_{mode}" if mode else "") + (" (Fisher mask)" if kind == "sparse" else ""))
        params = f"{any_.get('trainable_params', 0):,}"
        if "child_params" in any_:
            params += f" ({any_['child_params']:,} in the D mask)"
        if name == "blackbox":
            params += f" (z; prompt {any_.get('prompt_params', 0):,})"
        lat = " / ".join(f"{d['added_latency_ms']:+.1f}{'*' if 'latency_from' in d else ''}"
                         if "added_latency_ms" in d else "-" for d in (s, t))
        lines.append(f"| {name} | {what} | {lr if lr else '-'} | {acc(s)} | {acc(t)} | {params} | "
                     f"{any_.get('artifact_bytes', 0):,} | {lat} |")
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
    for run in out.get("resumed_by", []):
        base = " / ".join(f"{ms:.0f}" for ms in run.get("base_latency_ms", {}).values())
        lines += ["", f"Re-run later ({run['machine']}): {', '.join(run['trained']) or 'none'}; the added latency "
                      f"of the rows it ran is against the template in that run ({base} ms)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps per method (default 40)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=200, help="evaluation rows per data set (default 200)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all): " + ", ".join(METHODS))
    ap.add_argument("--datasets", default="sst2,trec")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fisher-batches", type=int, default=4, help="Child-Tuning_D / sparse Fisher batches (default 4)")
    ap.add_argument("--bbt-dim", type=int, default=500, help="BBT intrinsic dimension d (default 500)")
    ap.add_argument("--bbt-popsize", type=int, default=20)
    ap.add_argument("--bbt-rows", type=int, default=16, help="fixed training rows BBT scores candidates on")
    ap.add_argument("--bbt-budget-x", type=float, default=3.0,
                    help="BBT row passes = this x steps x batch size (default 3: a forward + backward)")
    ap.add_argument("--latency-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--artifact-dir", default=str(Path.home() / ".cache" / "frozenlm" / "bench" / "methods"),
                    help="where each method's trained artifact is kept")
    ap.add_argument("--resume", action="store_true", help="keep the results in --out, train only the missing methods")
    ap.add_argument("--table-only", action="store_true", help="print the table from --out and exit")
    args = ap.parse_args()
    if args.table_only:
        print(table(json.loads(Path(args.out).read_text())))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    if "template" not in methods:
        methods.insert(0, "template")  # the latency baseline
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = Backbone.load()
    data = {k: v for k, v in datasets(args.eval_rows, args.seed).items() if k in args.datasets.split(",")}
    out = {"backbone": backbone.name, "device": str(backbone.device),
           "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
           "command": "bench/methods.py " + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                   if k not in ("progress", "out", "table_only")),
           "budget": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                      "fisher_batches": args.fisher_batches},
           "datasets": {k: {"train_rows": len(v["train"]), "eval_rows": len(v["eval"]), "template": v["template"],
                            "labels": v["labels"]} for k, v in data.items()},
           "methods": {m: {"kind": METHODS[m][0], "config": METHODS[m][1], "lr": METHODS[m][2],
                           "child_tuning": METHODS[m][3]} for m in methods},
           "results": {}}
    run = out  # where this invocation's own facts go (its template's base latency)
    if args.resume and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        if previous["budget"] != out["budget"] or previous["datasets"] != out["datasets"]:
            raise SystemExit(f"--resume: {args.out} was made with another budget or other data; run without --resume")
        # every earlier row is kept; this run trains the methods missing there and is listed apart
        run = {"command": out["command"], "machine": out["machine"],
               "trained": [m for m in methods if m not in previous["results"]]}
        out.update(results=previous["results"], methods={**previous["methods"], **out["methods"]},
                   command=previous["command"], machine=previous["machine"],
                   base_latency_ms=previous["base_latency_ms"], resumed_by=previous.get("resumed_by", []) + [run])
    artifacts = Path(args.artifact_dir)
    artifacts.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, dict] = {d: {} for d in data}
    for name in methods:
        for dname, ds in data.items():
            saved = artifacts / f"{name}-{dname}.zip"
            if dname in out["results"].get(name, {}):
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
                continue
            t0 = time.monotonic()
            blob, metrics = run_method(name, backbone, ds, args)
            saved.write_bytes(blob)
            module = load_module(read_artifact(blob), backbone)
            loaded[dname][name] = module
            row = {"eval_accuracy": metrics.get("eval_accuracy"), "trainable_params": metrics["trainable_params"],
                   "artifact_bytes": len(blob), "seconds": round(time.monotonic() - t0, 1),
                   **{k: metrics[k] for k in ("child_params", "fisher_warmup_steps", "train_loss",
                                              "train_seconds", "initial_loss",
                                              "intrinsic_dim", "popsize", "generations", "evaluations", "train_rows",
                                              "row_passes", "fisher") if k in metrics}}
            if name == "blackbox":
                row["prompt_params"] = int(module.embeddings.numel())
            out["results"].setdefault(name, {})[dname] = row
            print(f"{name:22} {dname:5} acc={row['eval_accuracy']} params={row['trainable_params']} "
                  f"bytes={row['artifact_bytes']} {row['seconds']}s", flush=True)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for dname, ds in data.items():
        texts = [r["input"] for r in ds["eval"][:3]]
        lat = added_latency(backbone, loaded[dname], texts, args.latency_repeats)
        run.setdefault("base_latency_ms", {})[dname] = lat.pop("_base_ms")
        for name, ms in lat.items():
            out["results"][name][dname]["added_latency_ms"] = ms
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table(out))


if __name__ == "__main__":
    main()
