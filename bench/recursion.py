"""LM recursion vs single-pass prompt tuning, same training budget, on two real tasks.

Tasks:
- SST-2 (classification): ../shared/data/sst2, train on the train split, score the first
  `--eval-rows` dev rows (accuracy over the verbalizers " negative" / " positive").
- SQuAD reading (short-answer generation): ../shared/data/squad articles 0-19 for training,
  20-23 held out; the input is a window of `--window` words of the gold paragraph around the answer
  and the question; exact match and F1 of the greedy answer (SQuAD normalisation).

Set-ups, each trained for `--steps` steps of `--batch-size` rows at the same learning rate:
- prompt:  single-pass prompt tuning (P soft-prompt vectors);
- neural:  kind `recursive`, mode neural: pass 1 -> MLP connector -> pass 2 reads
           [P vectors | connector output | input]; its connector is first pre-trained for
           `--pretrain-steps` steps on language modelling over the training paragraphs (once,
           shared by both tasks), then trained on the task;
- textual: kind `recursive`, mode textual: pass 1 is the trained `prompt` module sampling 3
           candidate answers; pass 2 reads "Candidate answers: ..." + the input, its P vectors
           start from the prompt module's and are trained for `--steps` more steps (so textual
           recursion costs the prompt's budget twice; stated in the table).
Zero-shot base (the template alone) is reported too, plus trainable parameters and the added
latency of one request relative to the base (median of single-row passes, same run).

    .venv/bin/python bench/recursion.py                  # full run, writes bench/results/recursion.json
    .venv/bin/python bench/recursion.py --steps 2 --pretrain-steps 2 --eval-rows 8   # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from common import exact_match, f1, latency_ms, machine  # bench/common.py (the script's folder is on sys.path)
from tables import report  # bench/tables.py
from tqdm.auto import tqdm

from modules.core.backbone import Backbone
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.running import generate
from modules.core.stages import prepare
from modules.registry import kind_class
from modules.training.train import TrainOptions, lm_rows, train_module

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
SST2_TEMPLATE = "Review: {input}\nSentiment:"
SST2_LABELS = {"negative": " negative", "positive": " positive"}
QA_TEMPLATE = "{input}\nAnswer:"


def sst2(split: str) -> list[dict]:
    rows = []
    for line in (DATA / "sst2" / f"stsa.binary.{split}").read_text().splitlines():
        y, x = line.split(" ", 1)
        rows.append({"input": x, "label": "positive" if y == "1" else "negative"})
    return rows


def squad(articles: slice, window: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Rows {"input": context window + question, "target": first answer, "answers": all}, and the
    articles' paragraphs (language-modelling text)."""
    data = json.loads((DATA / "squad" / "dev-v1.1.part1of2.json").read_text())["data"][articles]
    rng = random.Random(seed)
    rows, paragraphs = [], []
    for article in data:
        for para in article["paragraphs"]:
            ctx = para["context"]
            paragraphs.append(ctx)
            for qa in para["qas"]:
                first = qa["answers"][0]
                before = len(ctx[:first["answer_start"]].split())
                words = ctx.split()
                start = max(0, min(before - rng.randint(0, window // 2), len(words) - window))
                text = " ".join(words[start:start + window])
                if first["text"] not in text:
                    continue  # the answer crosses the window's edge
                rows.append({"input": f"Context: {text}\nQuestion: {qa['question']}", "target": first["text"],
                             "answers": [a["text"] for a in qa["answers"]]})
    rng.shuffle(rows)
    return rows, paragraphs


@torch.inference_mode()
def evaluate(backbone, module, rows: list[dict], batch: int = 16) -> dict:
    hits, f1s = [], []
    for i in tqdm(range(0, len(rows), batch), desc=f"eval {module.kind}", leave=False):
        chunk = rows[i:i + batch]
        prepared = prepare(backbone, [(module, module.encode(r["input"])) for r in chunk])
        if "label" in chunk[0]:
            names = list(module.manifest.labels)
            lls = score(backbone, [ScoreItem(p.ids, p.contribution, module.label_ids) for p in prepared])
            hits += [float(names[int(ll.argmax())] == r["label"]) for r, ll in zip(chunk, lls)]
        else:
            items = [GenItem(p.ids, p.contribution, Sampling(max_new_tokens=16, stop=["\n"])) for p in prepared]
            for r, g in zip(chunk, generate(backbone, items)):
                hits.append(exact_match(g.text, r["answers"]))
                f1s.append(f1(g.text, r["answers"]))
    out = {"accuracy" if "label" in rows[0] else "exact_match": round(100 * statistics.mean(hits), 1)}
    if f1s:
        out["f1"] = round(100 * statistics.mean(f1s), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--lm-words", type=int, default=64, help="pre-training text: each paragraph's first N words")
    ap.add_argument("--window", type=int, default=40, help="SQuAD context words around the answer")
    ap.add_argument("--eval-rows", type=int, default=120)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recursion.json"))
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = Backbone.load()
    opts = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    qa_train, paragraphs = squad(slice(0, 20), args.window)
    qa_eval, _ = squad(slice(20, 24), args.window, seed=1)
    tasks = {
        "sst2": (sst2("train"), sst2("dev")[:args.eval_rows], {"template": SST2_TEMPLATE, "labels": SST2_LABELS}),
        "squad": (qa_train, qa_eval[:args.eval_rows],
                  {"template": QA_TEMPLATE, "labels": None, "generation": {"max_new_tokens": 16, "stop": ["\n"]}}),
    }
    P = args.prompt_tokens
    neural_cfg = {"mode": "neural", "pass2_prompt_tokens": P, "feed": "prepend", "connector": "mlp"}
    lm_text = [" ".join(p.split()[:args.lm_words]) for p in paragraphs]
    pretrained = train_module(backbone, "recursive", lm_rows(lm_text),
                              TrainOptions(max_steps=args.pretrain_steps, batch_size=args.batch_size, lr=args.lr),
                              config=neural_cfg, labels=None).module

    results = {}
    for task, (train, held, manifest) in tasks.items():
        base = kind_class("template").new(backbone, **manifest)
        prompt = train_module(backbone, "prompt", train, opts, config={"num_virtual_tokens": P}, **manifest)
        neural = train_module(backbone, "recursive", train, opts, init=pretrained, **manifest)
        start = kind_class("recursive").new(backbone, {"mode": "textual", "pass1_prompt_tokens": P,
                                                       "pass2_prompt_tokens": P, "candidate_tokens": 6}, **manifest)
        with torch.no_grad():
            start.prompt1.copy_(prompt.module.embeddings)
            start.prompt2.copy_(prompt.module.embeddings)
        textual = train_module(backbone, "recursive", train, opts, init=start, **manifest)
        setups = {"base": (base, None), "prompt": (prompt.module, prompt.metrics),
                  "neural": (neural.module, neural.metrics), "textual": (textual.module, textual.metrics)}
        sample = [r["input"] for r in held[:12]]
        base_ms = latency_ms(backbone, base, sample)
        results[task] = {}
        for name, (module, metrics) in setups.items():
            ms = latency_ms(backbone, module, sample)
            results[task][name] = {**evaluate(backbone, module, held),
                                   "trainable_parameters": sum(p.numel() for p in module.parameters()),
                                   "latency_ms": round(ms, 1), "latency_vs_base": round(ms / base_ms, 2),
                                   **({"train_seconds": metrics["train_seconds"]} if metrics else {})}
    out = {"machine": machine(backbone), "backbone": backbone.name,
           "settings": vars(args), "eval_rows": {t: len(v[1]) for t, v in tasks.items()},
           "pretrain_lm_rows": args.pretrain_steps * args.batch_size, "results": results}
    report("recursion", out, args.out)


if __name__ == "__main__":
    main()
