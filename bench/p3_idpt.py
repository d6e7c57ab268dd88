"""ID-PT vs one soft prompt on the P3 multitask mix (../shared/data/p3, 16 data sets).

Every template file is split once (seeded): its last `--eval-per-template` rows (after a shuffle)
are held out for evaluation, the rest are training rows. Both modules are trained on the same
mixture (each data set weighted by min(rows, --cap), T0's examples-proportional mixing) with the
same steps, batch size and learning rate, then scored per data set:

- a template whose completions take at most `--max-options` distinct values is an options task:
  rank classification (the option with the highest log-likelihood after the prompt) -> accuracy;
- any other template is scored by exact match of the greedy answer (lower-cased, punctuation,
  articles and extra spaces removed, as SQuAD does).

Base zero-shot is the frozen backbone on the same prompts with no module. Also reports trainable
parameters, artifact bytes and the added latency of one request (median over single-row passes,
relative to the base model, in the same run).

    .venv/bin/python bench/p3_idpt.py                   # train both, evaluate, write results + artifact
    .venv/bin/python bench/p3_idpt.py --steps 2 --eval-per-template 1 --every-template 20   # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

import torch
from common import latency_ms, machine, normalize  # bench/common.py (the script's folder is on sys.path)
from tables import report  # bench/tables.py
from tqdm.auto import tqdm

from modules.core.backbone import Backbone
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.running import generate
from modules.core.stages import prepare
from modules.registry import kind_class
from modules.training.train import TrainOptions, mix, train_module

ROOT = Path(__file__).resolve().parent.parent
P3 = ROOT.parent / "shared" / "data" / "p3"
DATASETS = ["ag_news", "app_reviews", "common_gen", "commonsense_qa", "dbpedia_14", "gigaword", "glue_mrpc",
            "glue_qqp", "kilt_tasks_hotpotqa", "qasc", "quarel", "quartz", "rotten_tomatoes", "sciq",
            "social_i_qa", "wiki_qa"]
END = "<|endoftext|>"


def dataset_of(template: str) -> str:
    return max((d for d in DATASETS if template.startswith(d + "_")), key=len)


def load(eval_per_template: int, max_prompt_tokens: int, tokenizer, seed: int = 0, every: int = 1):
    """{template: (train rows, held-out rows)}; rows are {"input", "target"}. `every`: keep every
    n-th template only (quick runs)."""
    out = {}
    for path in sorted(P3.glob("*.jsonl"))[::every]:
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            target = r["completion"].removesuffix(END).strip()
            if target and len(tokenizer(r["prompt"])["input_ids"]) <= max_prompt_tokens:
                rows.append({"input": r["prompt"], "target": target})
        random.Random(f"{seed}:{path.stem}").shuffle(rows)
        n = min(eval_per_template, len(rows) // 2)
        out[path.stem] = (rows[n:], rows[:n])
    return out


def options_of(train: list[dict], held: list[dict], max_options: int) -> list[str] | None:
    values = sorted({r["target"] for r in train + held})
    if 2 <= len(values) <= max_options and all(r["target"] in values for r in held):
        return values
    return None


@torch.inference_mode()
def evaluate(backbone, module, split, max_options: int, batch: int = 16) -> dict[str, float]:
    """Per data set: mean over its held-out rows of accuracy (options) or exact match."""
    tok = backbone.tokenizer
    hits: dict[str, list[float]] = defaultdict(list)
    jobs = []
    for template, (train, held) in split.items():
        opts = options_of(train, held, max_options)
        jobs += [(template, r, opts) for r in held]
    for i in tqdm(range(0, len(jobs), batch), desc=f"eval {module.kind}", leave=False):
        chunk = jobs[i:i + batch]
        rows = prepare(backbone, [(module, module.encode(r["input"])) for _, r, _ in chunk])
        scored = [(k, c) for k, c in enumerate(chunk) if c[2] is not None]
        if scored:
            items = [ScoreItem(rows[k].ids, rows[k].contribution, [tok(o, add_special_tokens=False)["input_ids"] for o in opts])
                     for k, (_, _, opts) in scored]
            for (k, (template, r, opts)), ll in zip(scored, score(backbone, items)):
                hits[dataset_of(template)].append(float(opts[int(ll.argmax())] == r["target"]))
        gen = [(k, c) for k, c in enumerate(chunk) if c[2] is None]
        if gen:
            items = [GenItem(rows[k].ids, rows[k].contribution, Sampling(max_new_tokens=min(48, len(tok(r["target"])["input_ids"]) + 4),
                                                stop=["\n"]))
                     for k, (_, r, _) in gen]
            for (k, (template, r, _)), g in zip(gen, generate(backbone, items)):
                hits[dataset_of(template)].append(float(normalize(g.text) == normalize(r["target"])))
    return {d: round(100 * sum(v) / len(v), 1) for d, v in sorted(hits.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="P for both modules")
    ap.add_argument("--eval-per-template", type=int, default=2)
    ap.add_argument("--max-prompt-tokens", type=int, default=192, help="drop longer rows (CPU budget)")
    ap.add_argument("--max-options", type=int, default=10)
    ap.add_argument("--cap", type=int, default=500, help="mixing weight of a data set = min(rows, cap)")
    ap.add_argument("--every-template", type=int, default=1, help="keep every n-th template (quick runs)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "p3_idpt.json"))
    ap.add_argument("--artifact", default=str(ROOT / "examples" / "tasks" / "p3-idpt.zip"))
    args = ap.parse_args()

    torch.manual_seed(0)
    backbone = Backbone.load()
    split = load(args.eval_per_template, args.max_prompt_tokens, backbone.tokenizer, every=args.every_template)
    by_set: dict[str, list[dict]] = defaultdict(list)
    for template, (train, _) in split.items():
        by_set[dataset_of(template)] += train
    sources = [(rows, min(len(rows), args.cap)) for _, rows in sorted(by_set.items())]
    rows = mix(sources, args.steps * args.batch_size)
    opts = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr)

    base = kind_class("template").new(backbone, template="{input}")
    trained = {}
    for kind, config in (("prompt", {"num_virtual_tokens": args.prompt_tokens}),
                         ("idpt", {"num_virtual_tokens": args.prompt_tokens})):
        trained[kind] = train_module(backbone, kind, rows, opts, config=config, template="{input}",
                                     labels=None, generation={"max_new_tokens": 48, "stop": ["\n"]},
                                     description=f"{kind} trained on the P3 mix (16 data sets)")
    results, setups = {}, {"base": base, **{k: r.module for k, r in trained.items()}}
    sample = [r["input"] for _, held in list(split.values())[::9] for r in held[:1]]
    base_ms = None
    for name, module in setups.items():
        scores = evaluate(backbone, module, split, args.max_options)
        ms = latency_ms(backbone, module, sample)
        base_ms = base_ms or ms
        results[name] = {"scores": scores, "average": round(statistics.mean(scores.values()), 1),
                         "trainable_parameters": sum(p.numel() for p in module.parameters()),
                         "artifact_bytes": len(module.to_artifact()),
                         "latency_ms": round(ms, 1), "latency_vs_base": round(ms / base_ms, 3),
                         **({"train": trained[name].metrics} if name in trained else {})}
    Path(args.artifact).write_bytes(trained["idpt"].artifact)
    held = sum(len(h) for _, h in split.values())
    out = {"machine": machine(backbone), "backbone": backbone.name,
           "backbone_parameters": sum(p.numel() for p in backbone.model.parameters()),
           "settings": vars(args), "held_out_rows": held, "train_rows_seen": len(rows), "results": results}
    report("p3_idpt", out, args.out)


if __name__ == "__main__":
    main()
