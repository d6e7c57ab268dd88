"""n samples of one prompt: one shared prefill against n separate requests, in one run.

Through the continuous engine on the embedded backbone (prefix cache off, so that nothing but
`n` shares work), three setups answer the same long prompt:

    n = 1         one request, one sample
    n = 8 shared  one request with n = 8 (`parameters.n`): the prompt is prefilled once and its
                  keys/values copied into eight slots; sample i seeded seed + i
    8 separate    eight requests (seeds seed .. seed + 7) submitted together

Every sample decodes the same number of tokens (EOS ignored), so the decode work is equal between
the two 8-sample setups. Reported, as ratios to n = 1: the positions the backbone computes in
prefill passes, the seconds spent in them, and the wall time from submitting to the last answer.
The shared and separate samples are checked to be the same texts.

    .venv/bin/python bench/n_samples.py [--prompt-tokens 400] [--new-tokens 32] [--n 8] [--repeats 3]

Prints a table and writes bench/results/n_samples.json (the README table is made from it).
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
PASSAGE = ("The lighthouse stood on a narrow spit of rock at the mouth of the harbour. For more than a century "
           "its keepers climbed the spiral stair each evening to light the lamp, trim the wick and wind the "
           "clockwork that turned the great lens. Ships coming home through fog listened for its horn and "
           "watched for its beam, which swept the water every twelve seconds. ")


class PrefillMeter:
    """Positions computed and seconds spent in the backbone's prefill passes (more than one new
    position per row; a decode step computes one), by wrapping `forward` on the instance."""

    def __init__(self, backbone):
        self.positions, self.seconds = 0, 0.0
        self._forward = backbone.forward
        backbone.forward = self._counting

    def _counting(self, embeds, mask, positions, cache=None, deltas=None):
        if embeds.shape[1] == 1:
            return self._forward(embeds, mask, positions, cache, deltas)
        start = time.perf_counter()
        out = self._forward(embeds, mask, positions, cache, deltas)
        self.seconds += time.perf_counter() - start
        self.positions += int(mask[:, -embeds.shape[1]:].sum())
        return out

    def take(self) -> tuple[int, float]:
        out = (self.positions, self.seconds)
        self.positions, self.seconds = 0, 0.0
        return out


def prompt_ids(module, tokens: int) -> list[int]:
    """A chat prompt of about `tokens` tokens: the passage repeated, then a question."""
    text = PASSAGE * max(1, tokens // 60)
    ids = module.encode(text + "\nWrite one more sentence of this story.")
    while len(ids) > tokens:
        text = text[: int(len(text) * 0.95)]
        ids = module.encode(text + "\nWrite one more sentence of this story.")
    return ids


def run(engine, module, ids, sampling: Sampling, setup: str, n: int, meter: PrefillMeter) -> dict:
    """One setup through the engine: its prefill positions and seconds, its wall time, its texts."""
    if setup == "separate":
        jobs = [Job(module, ids, Sampling(**{**sampling.__dict__, "seed": sampling.seed + i}),
                    len(ids) + sampling.max_new_tokens) for i in range(n)]
    else:
        jobs = [Job(module, ids, sampling, len(ids) + n * sampling.max_new_tokens, n=n)]
    meter.take()
    start = time.perf_counter()
    engine.scheduler.submit(jobs)
    results = [j.future.result(timeout=3600) for j in jobs]
    wall = time.perf_counter() - start
    positions, seconds = meter.take()
    samples = [g for r in results for g in (r if isinstance(r, list) else [r])]
    return {"prefill_positions": positions, "prefill_s": seconds, "wall_s": wall,
            "texts": [g.text for g in samples], "tokens": sum(len(g.token_ids) for g in samples)}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "n_samples.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = Backbone.load()
    module = NoModule(bb)
    ids = prompt_ids(module, args.prompt_tokens)
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0.8, top_p=0.95, seed=args.seed, ignore_eos=True)
    meter = PrefillMeter(bb)
    engine = ContinuousEngine(bb, Scheduler(), prefix_cache_tokens=0)
    engine.start()
    setups = {"n1": ("one", 1), "shared": ("shared", args.n), "separate": ("separate", args.n)}
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        run(engine, module, ids, sampling, "one", 1, meter)  # warm-up
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every setup alike
            for name, (setup, n) in setups.items():
                runs[name].append(run(engine, module, ids, sampling, setup, n, meter))
                print(name, {k: v for k, v in runs[name][-1].items() if k != "texts"}, flush=True)
    finally:
        engine.stop()
    same = all(s["texts"] == p["texts"] for s, p in zip(runs["shared"], runs["separate"]))
    results = {name: {"samples": setups[name][1],
                      "prefill_positions": runs[name][0]["prefill_positions"],
                      "prefill_s": round(statistics.median(r["prefill_s"] for r in rs), 4),
                      "wall_s": round(statistics.median(r["wall_s"] for r in rs), 3),
                      "generated_tokens": rs[0]["tokens"]}
               for name, rs in runs.items()}
    one = results["n1"]
    ratios = {f"{name}_over_n1": {k: round(results[name][k] / one[k], 2) for k in ("prefill_positions", "prefill_s",
                                                                                   "wall_s")}
              for name in ("shared", "separate")}
    ratios["separate_over_shared_wall_s"] = round(results["separate"]["wall_s"] / results["shared"]["wall_s"], 2)
    out = {"machine": machine(bb), "backbone": bb.name, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
           "n": args.n, "repeats": args.repeats, "seed": args.seed, "same_texts_shared_and_separate": same,
           "results": results, "ratios": ratios}
    report("n_samples", out, args.out)


if __name__ == "__main__":
    main()
