"""Rank classification with per-request choices against free generation, on held-out AG News in
its P3 format: the shipped `p3-idpt` example and the backbone alone, in one run.

The rows are AG News test-set articles (`../shared/data/ag_news/train.csv`, a split of the official
test set; the P3 mix the example was trained on holds training-set articles), rendered with P3's
`classify_with_choices` template. Each is answered two ways: greedy generation (8 tokens, correct
when the text is the class name), and `choices` (every class name scored as a continuation, as
`parameters.choices` does on the server).

    .venv/bin/python bench/choices.py [--rows 200]

Prints a table and writes bench/results/choices.json.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from common import machine  # bench/common.py (the script's folder is on sys.path)
from tables import report  # bench/tables.py

from modules.core.artifact import read_artifact
from modules.core.backbone import Backbone
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.running import generate
from modules.core.stages import prepare
from modules.registry import kind_class, load_module

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ag_news" / "train.csv"
QUESTION = "\nIs this a piece of news regarding world politics, sports, business, or science and technology?\n"
CLASSES = ["World politics", "Sports", "Business", "Science and technology"]  # AG News classes 1-4, as P3 names them


def rows(n: int) -> list[tuple[str, str]]:
    with DATA.open(newline="") as f:
        return [(f"{title} {text} {QUESTION}", CLASSES[int(y) - 1]) for y, title, text in list(csv.reader(f))[:n]]


@torch.inference_mode()
def accuracy(bb, module, data: list[tuple[str, str]], batch: int = 16) -> dict[str, float]:
    choices = [bb.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CLASSES]
    greedy = ranked = 0
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        prepared = prepare(bb, [(module, module.encode(x)) for x, _ in chunk])
        texts = generate(bb, [GenItem(r.ids, r.contribution, Sampling(max_new_tokens=8)) for r in prepared])
        lls = score(bb, [ScoreItem(r.ids, r.contribution, choices) for r in prepared])
        for (_, gold), g, ll in zip(chunk, texts, lls):
            greedy += g.text.strip() == gold
            ranked += CLASSES[int(ll.argmax())] == gold
    return {"greedy": round(greedy / len(data), 3), "choices": round(ranked / len(data), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "choices.json"))
    args = ap.parse_args()
    bb = Backbone.load()
    data = rows(args.rows)
    idpt = load_module(read_artifact((ROOT / "examples" / "tasks" / "p3-idpt.zip").read_bytes()), bb)
    results = {"p3-idpt": accuracy(bb, idpt, data),
               "backbone alone (template)": accuracy(bb, kind_class("template").new(bb), data)}
    out = {"machine": machine(bb), "backbone": bb.name, "rows": len(data), "classes": CLASSES,
           "chance": round(1 / len(CLASSES), 3), "results": results}
    report("choices", out, args.out)


if __name__ == "__main__":
    main()
