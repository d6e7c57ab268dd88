"""Continuous against static batching: one open-loop mixed workload through both engines, in one run.

The same Poisson arrivals over 16 tasks of mixed kinds go through the static engine (a batch runs
to completion before the next is taken) and the continuous one (rows join and leave at every
step), each in this process on the embedded backbone. A quarter of the requests are long
generations (128-256 tokens), the rest short: one-pass classifications or 8-token answers.
Reported: throughput (generated tokens/s over the run), p50/p99 latency of the short requests
against their latency on an idle server, p50/p99 time to first token, the prefix-cache hit ratio;
and, separately, the time to first token of a `prompt` task with a 40-token fixed template with the
prefix cache on and off.

    .venv/bin/python bench/continuous.py [--requests 48] [--rate 1.0] [--seed 0]

Prints a table and writes bench/results/continuous.json (the README table is made from it).
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
from mixed_batch import PROMPTS, _randomized, lora_modules
from tables import report  # bench/tables.py

from modules.core.backbone import Backbone
from modules.core.decode import Sampling
from modules.registry import kind_class
from service.continuous import ContinuousEngine
from service.engine import Engine
from service.scheduler import Job, Scheduler

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"negative": " negative", "positive": " positive"}
REVIEWS = ["a gorgeous , witty , deeply moving film .", "a dull , lifeless and tedious mess .",
           "the performances are strong but the script is thin .", "i loved every minute of it ."]
HEAD = ("You are a concise assistant for the support desk of a small online shop. Answer the customer's "
        "question below in one short, friendly sentence, without any preamble or sign-off.\n\n"
        "Question: {input}\nAnswer:")


def tasks(bb) -> dict[str, tuple[object, str]]:
    """16 tasks: name -> (module, what it answers: "label" or "text")."""
    loras = lora_modules(bb)
    out = {}
    for i in range(4):  # classification: soft prompts and LoRA with a template and labels
        kind, cfg = ("prompt", {"num_virtual_tokens": 4 + i}) if i % 2 else ("lora", {"r": 4, "seed": i})
        m = kind_class(kind).new(bb, cfg, template="Review: {input}\nSentiment:", labels=LABELS)
        out[f"cls-{kind}-{i}"] = (_randomized(m, 400 + i), "label")
    for i in range(5):
        out[f"gen-lora-{i}"] = (loras[i], "text")
    for i, p in enumerate((4, 8)):  # with a fixed instruction before the input: what the prefix cache is for
        prompt = kind_class("prompt").new(bb, {"num_virtual_tokens": p}, template=HEAD)
        prefix = kind_class("prefix").new(bb, {"num_virtual_tokens": p}, template=HEAD)
        out[f"gen-prompt-{i}"] = (_randomized(prompt, 500 + i), "text")
        out[f"gen-prefix-{i}"] = (_randomized(prefix, 600 + i), "text")
    parts = [{"kind": "lora", "config": {"r": 4}}, {"kind": "prompt", "config": {"num_virtual_tokens": 4}}]
    out["gen-compose"] = (_randomized(kind_class("compose").new(bb, {"parts": parts}), 700), "text")
    out["gen-ia3"] = (_randomized(kind_class("ia3").new(bb), 800), "text")
    out["gen-base"] = (kind_class("template").new(bb), "text")
    assert len(out) == 16, len(out)
    return {k: (m.eval().requires_grad_(False), what) for k, (m, what) in out.items()}


def workload(names: list[str], kinds: dict, n: int, rate: float, seed: int) -> list[dict]:
    """n requests: arrival time, task, input, and how many tokens (None: a classification)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    gens = [k for k in names if kinds[k] == "text"]
    for i in range(n):
        t += rng.expovariate(rate)
        if i % 4 == 3:  # a quarter: long generations
            out.append({"at": t, "task": rng.choice(gens), "text": rng.choice(PROMPTS), "tokens": rng.randint(128, 256)})
        else:
            task = rng.choice(names)
            text = rng.choice(REVIEWS if kinds[task] == "label" else PROMPTS)
            out.append({"at": t, "task": task, "text": text, "tokens": None if kinds[task] == "label" else 8})
    return out


class Timed:
    """A job and when its first text came out."""

    def __init__(self, module, task: str, text: str, tokens: int | None):
        ids = module.encode(text)
        sampling = None if tokens is None else Sampling(max_new_tokens=tokens, ignore_eos=True)
        cost = len(ids) + (tokens or 8)
        self.first = None
        self.job = Job(module, ids, sampling, cost, on_text=self._text if tokens else None, task=task)

    def _text(self, piece: str, *_) -> None:
        if self.first is None:
            self.first = time.monotonic()

    @property
    def latency(self) -> float:
        return self.job.finished - self.job.enqueued

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.job.enqueued


def run(engine, requests: list[dict], modules: dict) -> list[tuple[dict, Timed]]:
    """Submit each request at its arrival time (open loop); wait for all."""
    engine.start()
    timed = [(r, Timed(modules[r["task"]][0], r["task"], r["text"], r["tokens"])) for r in requests]
    start = time.monotonic()
    try:
        for r, t in timed:
            time.sleep(max(0.0, start + r["at"] - time.monotonic()))
            t.job.enqueued = time.monotonic()
            engine.scheduler.submit([t.job])
        for _, t in timed:
            t.job.future.result(timeout=3600)
    finally:
        engine.stop()
    return timed


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(timed: list[tuple[dict, Timed]], idle_short_p50: float) -> dict:
    short = [t.latency for r, t in timed if r["tokens"] in (None, 8)]
    ttft = [t.ttft for _, t in timed if t.ttft is not None]
    tokens = sum(len(t.job.future.result().token_ids) for r, t in timed if r["tokens"])
    span = max(t.job.finished for _, t in timed) - min(t.job.enqueued for _, t in timed)
    p50 = statistics.median(short)
    return {"tokens_per_s": round(tokens / span, 1), "generated_tokens": tokens, "seconds": round(span, 2),
            "short_p50_s": round(p50, 3), "short_p99_s": round(pct(short, 0.99), 3),
            "short_p50_over_idle": round(p50 / idle_short_p50, 2),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p99_s": round(pct(ttft, 0.99), 3)}


def idle_latency(bb, requests: list[dict], modules: dict) -> float:
    """Median latency of the short requests, sent one at a time to an idle continuous engine (its
    default settings, the prefix cache on, as under load)."""
    engine = ContinuousEngine(bb, Scheduler())
    engine.start()
    lat = []
    try:
        for r in [r for r in requests if r["tokens"] in (None, 8)][:16]:
            t = Timed(modules[r["task"]][0], r["task"], r["text"], r["tokens"])
            engine.scheduler.submit([t.job])
            t.job.future.result()
            lat.append(t.latency)
    finally:
        engine.stop()
    return statistics.median(lat)


def prefix_ttft(bb, n: int) -> dict:
    """Median time to first token of a `prompt` task with a 40-token fixed template head, requests
    one at a time on an idle continuous engine, with and without the prefix cache."""
    module = _randomized(kind_class("prompt").new(bb, {"num_virtual_tokens": 8}, template=HEAD), 900).eval()
    head = len(bb.tokenizer(HEAD.split("{input}")[0])["input_ids"])
    out = {"template_head_tokens": head}
    for name, tokens in (("off", 0), ("on", 8192)):
        engine = ContinuousEngine(bb, Scheduler(), prefix_cache_tokens=tokens)
        engine.start()
        ttft = []
        try:
            for i in range(n + 1):
                t = Timed(module, "faq", f"{PROMPTS[i % len(PROMPTS)]} (ticket {i})", 2)
                engine.scheduler.submit([t.job])
                t.job.future.result()
                if i:  # the first request fills the cache
                    ttft.append(t.ttft)
        finally:
            engine.stop()
        out[f"ttft_p50_ms_cache_{name}"] = round(1000 * statistics.median(ttft), 1)
        if tokens:
            c = engine.batch.prefix_cache
            out["hit_ratio"] = round(c.hits / max(1, c.hits + c.misses), 3)
    out["reduction"] = round(1 - out["ttft_p50_ms_cache_on"] / out["ttft_p50_ms_cache_off"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0, help="arrivals per second (Poisson)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-requests", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "continuous.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = Backbone.load()
    modules = tasks(bb)
    requests = workload(sorted(modules), {k: w for k, (_, w) in modules.items()}, args.requests, args.rate, args.seed)
    idle = idle_latency(bb, requests, modules)
    print(f"idle short-request latency p50: {idle * 1000:.0f} ms", flush=True)
    results, hit_ratio = {}, None
    for name, make in (("static", lambda: Engine(bb, Scheduler())),
                       ("continuous", lambda: ContinuousEngine(bb, Scheduler()))):
        engine = make()
        results[name] = summary(run(engine, requests, modules), idle)
        if name == "continuous":
            c = engine.batch.prefix_cache
            hit_ratio = round(c.hits / max(1, c.hits + c.misses), 3)
            results[name]["prefix_cache_hit_ratio"] = hit_ratio
        print(name, json.dumps(results[name]), flush=True)
    ttft = prefix_ttft(bb, args.ttft_requests)
    print("prefix cache", json.dumps(ttft), flush=True)
    out = {"machine": machine(bb), "backbone": bb.name, "requests": args.requests, "rate_per_s": args.rate,
           "seed": args.seed, "idle_short_p50_s": round(idle, 3), "results": results,
           "ratios": {"throughput_continuous_over_static": round(results["continuous"]["tokens_per_s"]
                                                                 / results["static"]["tokens_per_s"], 2),
                      "short_p50_static_over_continuous": round(results["static"]["short_p50_s"]
                                                                / results["continuous"]["short_p50_s"], 1)},
           "prefix_cache_ttft": ttft}
    report("continuous", out, args.out)


if __name__ == "__main__":
    main()
