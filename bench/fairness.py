"""Turns across tasks against one FIFO queue: how long another task's short request waits behind
one task's backlog, in one run.

Through the continuous engine on the embedded backbone, task `bulk` queues `--bulk` requests of
`--n` samples x `--tokens` tokens each (EOS ignored; the running batch holds `--max-running`
rows, so they run a few at a time), and right after them task `other` sends a short generation
(8 tokens) and a one-pass classification (two answer choices). The same workload runs under the
server's scheduler (a line per task, taken in turns) and under one FIFO line (the previous
scheduler: a job that does not fit holds back everything behind it), interleaved `--repeats` times.
Reported: the wait of `other`'s requests (submit to answer) and the time `bulk` takes to finish,
median per policy, and their ratios FIFO / turns; and whether every request got the same answer
under both policies.

    .venv/bin/python bench/fairness.py [--bulk 6] [--n 8] [--tokens 32] [--max-running 16] [--repeats 2]

Prints a table and writes bench/results/fairness.json (the README table is made from it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import machine  # bench/common.py (the script's folder is on sys.path)
from tables import report  # bench/tables.py

from modules.core.backbone import Backbone
from modules.core.decode import Sampling
from modules.kinds.base import NoModule
from service.continuous import ContinuousEngine
from service.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parent.parent


class OneLine(Scheduler):
    """The previous scheduler: every job in one FIFO line."""

    @staticmethod
    def line(job: Job) -> str:
        return ""


def workload(module, args) -> tuple[list[Job], Job, Job]:
    bulk = []
    for i in range(args.bulk):
        ids = module.encode(f"Write a long story about a lighthouse keeper, part {i + 1}.")
        bulk.append(Job(module, ids, Sampling(max_new_tokens=args.tokens, temperature=0.8, seed=i, ignore_eos=True),
                        len(ids) + args.n * args.tokens, task="bulk", n=args.n))
    ids = module.encode("What is the capital of France?")
    short = Job(module, ids, Sampling(max_new_tokens=8), len(ids) + 8, task="other")
    ids = module.encode("Is the sky blue? Answer:")
    choices = {"yes": module.encode(" yes")[-1:], "no": module.encode(" no")[-1:]}
    scored = Job(module, ids, None, len(ids) + 1, task="other", labels=choices)
    return bulk, short, scored


def run(bb, module, policy, args) -> dict:
    engine = ContinuousEngine(bb, policy(max_queue=1024), max_running=args.max_running, prefix_cache_tokens=0)
    engine.start()
    try:
        bulk, short, scored = workload(module, args)
        start = time.perf_counter()
        for job in bulk:  # one request each, as separate callers of the task would send them
            engine.scheduler.submit([job])
        engine.scheduler.submit([short])
        engine.scheduler.submit([scored])
        results = [j.future.result(timeout=3600) for j in [*bulk, short, scored]]
        end = {id(j): j.finished for j in [*bulk, short, scored]}
    finally:
        engine.stop()
    waits = {name: round(end[id(j)] - j.enqueued, 3) for name, j in (("short", short), ("scored", scored))}
    answers = [[g.text for g in r] if isinstance(r, list) else (r.text if hasattr(r, "text") else r.label) for r in results]
    return {**waits, "bulk_s": round(max(end[id(j)] for j in bulk) - start, 3), "answers": answers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bulk", type=int, default=6, help="task bulk's requests")
    ap.add_argument("--n", type=int, default=8, help="samples per bulk request")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per bulk sample")
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fairness.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = Backbone.load()
    module = NoModule(bb)
    policies = {"turns": Scheduler, "fifo": OneLine}
    runs: dict[str, list[dict]] = {name: [] for name in policies}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        for name, policy in policies.items():
            runs[name].append(run(bb, module, policy, args))
            print(name, {k: v for k, v in runs[name][-1].items() if k != "answers"}, flush=True)
    results = {name: {k: round(statistics.median(r[k] for r in rs), 3) for k in ("short", "scored", "bulk_s")}
               for name, rs in runs.items()}
    ratios = {k: round(results["fifo"][k] / results["turns"][k], 2) for k in ("short", "scored", "bulk_s")}
    same = all(r["answers"] == runs["turns"][0]["answers"] for rs in runs.values() for r in rs)
    out = {"machine": machine(bb), "backbone": bb.name, "bulk": args.bulk, "n": args.n, "tokens": args.tokens,
           "max_running": args.max_running, "repeats": args.repeats, "same_answers": same,
           "results": results, "fifo_over_turns": ratios}
    report("fairness", out, args.out)


if __name__ == "__main__":
    main()
