"""PPT (Gu et al. 2022, "Pre-trained Prompt Tuning"): pre-train one soft prompt on a multitask mix.

The mix is the P3 sample in ../shared/data/p3 (16 data sets, one file per promptsource template),
read and split exactly as `bench/p3_idpt.py` does (the same held-out rows per template, never
trained on; rows with prompts over `--max-prompt-tokens` tokens dropped), mixed with each data set
weighted by min(rows, --cap) (T0's examples-proportional mixing). One `prompt` module (P vectors
from sampled vocabulary embeddings, the "random" start) is trained on it with the generation loss
(the completion's tokens, then EOS) and written as a plain `prompt` artifact. Downstream prompts
start from it (`train_module(..., init=module)` / `frozenlm train prompt --init ppt-prompt.zip`):
the `prompt-ppt` rows of `bench/methods.py`'s few-shot block.

    .venv/bin/python bench/ppt.py                     # pre-train, write bench/results/ppt-prompt.zip + ppt.json
    .venv/bin/python bench/ppt.py --steps 2           # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from p3_idpt import dataset_of, load  # bench/p3_idpt.py (the script's folder is on sys.path)

from modules.core.backbone import Backbone
from modules.training.train import TrainOptions, mix, train_module

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--prompt-tokens", type=int, default=16, help="P (the downstream prompts' P)")
    ap.add_argument("--eval-per-template", type=int, default=2, help="held-out rows per template, as bench/p3_idpt.py")
    ap.add_argument("--max-prompt-tokens", type=int, default=128, help="drop longer rows (CPU budget)")
    ap.add_argument("--cap", type=int, default=500, help="mixing weight of a data set = min(rows, cap)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppt.json"))
    ap.add_argument("--artifact", default=str(ROOT / "bench" / "results" / "ppt-prompt.zip"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = Backbone.load()
    split = load(args.eval_per_template, args.max_prompt_tokens, backbone.tokenizer)
    by_set: dict[str, list[dict]] = defaultdict(list)
    for template, (train, _) in split.items():
        by_set[dataset_of(template)] += train
    sources = [(rows, min(len(rows), args.cap)) for _, rows in sorted(by_set.items())]
    rows = mix(sources, args.steps * args.batch_size, seed=args.seed)
    opts = TrainOptions(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        progress=args.progress)
    start = time.monotonic()
    result = train_module(backbone, "prompt", rows, opts,
                          config={"num_virtual_tokens": args.prompt_tokens, "init": "vocab", "seed": args.seed},
                          template="{input}", labels=None, generation={"max_new_tokens": 48, "stop": ["\n"]},
                          description=f"PPT: a soft prompt pre-trained on the P3 mix ({len(by_set)} data sets), "
                                      f"{args.steps} steps x {args.batch_size}")
    Path(args.artifact).write_bytes(result.artifact)
    h = result.history
    first, last = h[:10], h[-10:]
    out = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads", "backbone": backbone.name,
           "settings": {k: v for k, v in vars(args).items() if k not in ("progress", "out", "artifact")},
           "data_sets": {d: len(r) for d, r in sorted(by_set.items())},
           "templates": len(split), "train_rows_seen": len(rows),
           "loss_first_10_steps": round(sum(first) / len(first), 4), "loss_last_10_steps": round(sum(last) / len(last), 4),
           "seconds": round(time.monotonic() - start, 1), "artifact_bytes": len(result.artifact),
           "trainable_params": result.metrics["trainable_params"]}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
