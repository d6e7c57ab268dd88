"""The cost of structured output per decode step, as a ratio to an unconstrained decode step of the
embedded backbone, at batch sizes 1 and 8, in one run.

The denominator is a decode step of the engine's running batch (`modules.core.running.RunningBatch`,
every row generating, no constraint). The numerator is what a constrained step adds, measured in a
decode loop over the same backbone where every row is constrained and sampled (temperature 0.8, so
rows differ): computing each row's token mask (llguidance), applying it to the logits, and
advancing each row's matcher by its token. Masks are computed one row after the other (the
default); with 8 rows, also in llguidance's thread pool, for comparison. A row whose grammar
completes starts over, so every step of the run has all its rows constrained. Three constraints:
a JSON schema, a regex, any JSON object. The unconstrained step is measured right before each
constrained run, so that both see the same load of a shared machine. Also reported: the compile
time of each constraint (cold: its first mask included) and of llguidance's view of the tokenizer
(once per backbone).

    .venv/bin/python bench/constraint.py [--steps 48] [--batches 1 8]

Prints a table and writes bench/results/constraint.json.
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
from modules.core.batch import Contribution
from modules.core.constraint import Constraint, Grammars, apply_bitmask, fill_bitmask
from modules.core.decode import GenItem, Sampling
from modules.core.running import RunningBatch

ROOT = Path(__file__).resolve().parent.parent
ORDER = {"type": "object", "properties": {
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                 "required": ["name", "email"]},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "quantity": {"type": "integer", "minimum": 1},
        "price": {"type": "number"}}, "required": ["sku", "quantity"]}, "minItems": 1},
    "status": {"enum": ["pending", "paid", "shipped"]}, "notes": {"type": ["string", "null"]}},
    "required": ["customer", "items", "status"], "additionalProperties": False}
CONSTRAINTS = {
    "json_schema": Constraint.json_schema(ORDER),
    "regex": Constraint.regex(r"[A-Z][a-z]+ [A-Z][a-z]+, (19|20)[0-9]{2}-[01][0-9]-[0-3][0-9], [a-z ,.']{10,200}"),
    "json_object": Constraint.json_object(),
}
PROMPT = "Write one order of our online shop as JSON: the customer, the items bought and the status."


def _chat(bb) -> list[int]:
    return bb.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)


def ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 3)


@torch.inference_mode()
def free_step(bb, prompt: list[int], rows: int, steps: int) -> list[float]:
    """Seconds of each decode step of the running batch: `rows` rows, no constraint."""
    batch = RunningBatch(bb, prefill_tokens=rows * len(prompt))
    batch.join([GenItem(prompt, Contribution(), Sampling(max_new_tokens=steps + 2, temperature=0.8, seed=i,
                                                         ignore_eos=True)) for i in range(rows)])
    batch.step()  # the prefill, and each row's first token
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def constrained(bb, grammars: Grammars, prompt: list[int], c: Constraint, rows: int, steps: int,
                parallel: bool) -> dict[str, list[float] | int]:
    """A decode loop with every row constrained: the seconds of each step's mask computation,
    masking and matcher advance, and how many rows completed their grammar."""
    grammar = grammars.compile(c)
    matchers = [grammar.matcher() for _ in range(rows)]
    cache, gen, T = bb.new_cache(), torch.Generator().manual_seed(0), len(prompt)
    hidden = bb.forward(bb.embed(torch.tensor([prompt] * rows)), torch.ones(rows, T, dtype=torch.long),
                        torch.arange(T).expand(rows, T), cache)
    out = {"fill": [], "apply": [], "advance": [], "completed": 0}
    for step in range(steps):
        logits = bb.logits(hidden[:, -1])
        t0 = time.perf_counter()
        bits, errors = fill_bitmask(matchers, parallel)
        t1 = time.perf_counter()
        empty = apply_bitmask(logits, list(range(rows)), bits, grammars.vocab_size)
        t2 = time.perf_counter()
        assert not any(errors) and not any(empty), errors
        nxt = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=gen)[:, 0].tolist()
        t3 = time.perf_counter()
        for m, t in zip(matchers, nxt):
            m.advance(t)
        t4 = time.perf_counter()
        for r, m in enumerate(matchers):
            if m.is_terminated():  # complete: start the row's grammar over
                out["completed"] += 1
                matchers[r] = grammar.matcher()
        out["fill"].append(t1 - t0)
        out["apply"].append(t2 - t1)
        out["advance"].append(t4 - t3)
        hidden = bb.forward(bb.embed(torch.tensor(nxt)[:, None]), torch.ones(rows, T + step + 1, dtype=torch.long),
                            torch.full((rows, 1), T + step), cache)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    import llguidance

    bb = Backbone.load(device="cpu", dtype="float32")
    grammars = Grammars(bb.tokenizer, sorted(bb.eos_token_ids))
    start = time.perf_counter()
    grammars.tokenizer
    tokenizer_ms = round(1000 * (time.perf_counter() - start), 1)
    compile_ms = {}
    for kind, c in CONSTRAINTS.items():
        start = time.perf_counter()
        grammars.compile(c)
        compile_ms[kind] = round(1000 * (time.perf_counter() - start), 1)
    prompt = _chat(bb)
    free_step(bb, prompt, 1, 4)  # warm up
    results = {}
    for rows in args.batches:
        kinds, steps = {}, []
        for kind, c in CONSTRAINTS.items():
            # The unconstrained step is measured next to each constrained run: a shared machine's
            # load changes over a run, and the ratio should compare like with like.
            step = statistics.median(free_step(bb, prompt, rows, args.steps))
            steps.append(step)
            runs = {p: constrained(bb, grammars, prompt, c, rows, args.steps, p)
                    for p in ((False, True) if rows > 1 else (False,))}
            o = runs[False]  # the default: masks one row after the other
            cost = statistics.median([f + a + d for f, a, d in zip(o["fill"], o["apply"], o["advance"])])
            kinds[kind] = {"free_step_ms": round(1000 * step, 3), "fill_ms": ms(o["fill"]), "apply_ms": ms(o["apply"]),
                           "advance_ms": ms(o["advance"]),
                           "fill_p90_ms": round(1000 * sorted(o["fill"])[int(0.9 * len(o["fill"]))], 3),
                           "cost_ms": round(1000 * cost, 3), "ratio": round(cost / step, 4),
                           "completed_rows": o["completed"],
                           "fill_ms_parallel": ms(runs[True]["fill"]) if rows > 1 else None}
            print(f"rows {rows} {kind}: step {kinds[kind]['free_step_ms']} ms, constraint {kinds[kind]['cost_ms']} ms, "
                  f"x{kinds[kind]['ratio']}", flush=True)
        results[str(rows)] = {"free_step_ms": round(1000 * statistics.median(steps), 3), "constraints": kinds}
    r = {"backbone": bb.name, "machine": machine(bb), "llguidance": llguidance.__version__, "steps": args.steps,
         "tokenizer_ms": tokenizer_ms, "compile_ms": compile_ms, "results": results,
         "constraints": {k: {"type": c.type, "spec": c.spec} for k, c in CONSTRAINTS.items()}}
    report("constraint", r)


if __name__ == "__main__":
    main()
