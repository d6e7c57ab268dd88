"""Label scoring options on the zero-shot `template` rows of the methods table: plain, length
normalization, contextual calibration, and both, on SST-2 and TREC (the same held-out rows,
template and verbalizers as `bench/methods.py`), in one run.

    .venv/bin/python bench/calibration.py [--eval-rows 200]

Prints a table and writes bench/results/calibration.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine  # bench/common.py (the script's folder is on sys.path)
from methods import datasets  # the methods table's data sets, templates and verbalizers
from tables import report  # bench/tables.py

from modules.core.backbone import Backbone
from modules.core.module import LabelScoring
from modules.registry import kind_class
from modules.training.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"plain": LabelScoring(), "length-normalized": LabelScoring(length_normalize=True),
            "calibrated": LabelScoring(calibrate=True),
            "calibrated + length-normalized": LabelScoring(calibrate=True, length_normalize=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-rows", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibration.json"))
    args = ap.parse_args()
    bb = Backbone.load()
    results = {}
    for name, ds in datasets(args.eval_rows, args.seed).items():
        for variant, scoring in VARIANTS.items():
            module = kind_class("template").new(bb, template=ds["template"], labels=ds["labels"], scoring=scoring)
            acc = evaluate(module, bb, ds["eval"])["eval_accuracy"]
            results.setdefault(variant, {})[name] = acc
            print(f"{name:5} {variant:32} {acc:.3f}", flush=True)
    out = {"machine": machine(bb), "backbone": bb.name, "eval_rows": args.eval_rows, "seed": args.seed,
           "results": results}
    report("calibration", out, args.out)


if __name__ == "__main__":
    main()
