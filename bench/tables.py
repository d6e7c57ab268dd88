"""Markdown tables for the README, made from the JSON the benchmarks write: the one way every bench
prints its result (`report` at the end of each bench; `bench/tables.py` reprints them all).

    .venv/bin/python bench/tables.py            # prints every table whose JSON exists
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(header: list[str], rows: list[list], numeric_from: int = 1) -> list[str]:
    """A markdown table's lines: columns from `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(str(c) for c in r)} |" for r in rows)]


def report(name: str, out: dict, path: Path | str | None = None) -> None:
    """Write a bench's JSON (to `path`, default bench/results/<name>.json) and print its table."""
    path = Path(path or RESULTS / f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(TABLES[name](out))


def mixed_batch(r: dict) -> str:
    lines = [f"Embedded backbone ({r['backbone']}), {r['rows']} rows x {r['new_tokens']} new tokens, greedy; "
             f"{r['machine']}.", "", "| setup | tokens/s | tokens | seconds |", "|---|---:|---:|---:|"]
    for v in r["results"].values():
        lines.append(f"| {v['label']} | {v['tokens_per_s']} | {v['tokens']} | {v['seconds']} |")
    q = r["ratios"]
    lines += ["", "| ratio | value | target |", "|---|---:|---|",
              f"| (c) / (a) | {q['c_over_a']} | >= 0.8 |",
              f"| (c) / (e) | {q['c_over_e']} | >= 5 |",
              f"| (c') / (d), LoRA-only mix | {q['c_lora16_over_d']} | >= 1 |",
              f"| LoRA overhead, 1 - (b)/(a) | {q['lora_overhead_b_vs_a']} | <= 0.15 |",
              "", f"Cold load of a module (store -> validated -> device): p50 {r['cold_load_ms']['p50']} ms, "
                  f"p95 {r['cold_load_ms']['p95']} ms."]
    return "\n".join(lines)


def sst2_http(r: dict) -> str:
    lines = [f"SST-2 dev through `POST /tasks/<name>/infer`, template `{json.dumps(r['template'])}`, "
             f"verbalizers {r['labels']}; {r['machine']}.", "", "| task | accuracy | rows | seconds |",
             "|---|---:|---:|---:|"]
    for name, v in r["results"].items():
        lines.append(f"| `{name}` | {v['accuracy']:.4f} | {v['rows']} | {v['seconds']} |")
    return "\n".join(lines)


def squad_rrr(r: dict) -> str:
    c, k = r["config"], r["config"]["candidates"]
    lines = [f"SQuAD v1.1 dev: {r['eval_questions']} questions of the {len(r['held_out_articles'])} held-out articles "
             f"(never trained on); corpus: all {r['corpus_documents']} paragraphs of the 24 articles; {c['retrieval']} "
             f"top {k}, reranker on the first {r.get('reranker_depth') or c['reranker_depth'] or 'third of the'} layers ({c['pool']} pooling), context budget "
             f"{c['context_tokens']} tokens, reader prompt {c['reader_prompt_tokens']} vectors; {r['backbone']}, "
             f"{r['machine']}.", "",
             "| setup | recall in context | exact match | F1 |", "|---|---:|---:|---:|"]
    for name, v in r["results"].items():
        rec = f"{v['recall_in_context']:.1f}" if "recall_in_context" in v else "-"
        lines.append(f"| {name} | {rec} | {v['exact_match']:.1f} | {v['f1']:.1f} |")
    lines += ["", f"| retrieval | recall@{k} (gold paragraph) | median ms/query | p95 ms/query |", "|---|---:|---:|---:|"]
    for m, v in r["retrieval_latency_ms"].items():
        lines.append(f"| {m} | {r[f'retrieval_recall_at_{k}'][m]:.1f} | {v['median_ms']} | {v['p95_ms']} |")
    return "\n".join(lines)


def continuous(r: dict) -> str:
    lines = [f"Embedded backbone ({r['backbone']}), {r['requests']} requests, Poisson arrivals at {r['rate_per_s']}/s "
             f"over 16 tasks of mixed kinds (a quarter 128-256-token generations, the rest one-pass "
             f"classifications or 8-token answers), seed {r['seed']}; {r['machine']}. Short requests alone on an "
             f"idle server: p50 {r['idle_short_p50_s']} s.", "",
             "| engine | tokens/s | short p50 (s) | short p99 (s) | short p50 / idle | TTFT p50 (s) | TTFT p99 (s) |"
             " prefix-cache hits |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in r["results"].items():
        hits = v.get("prefix_cache_hit_ratio")
        lines.append(f"| {name} | {v['tokens_per_s']} | {v['short_p50_s']} | {v['short_p99_s']} | "
                     f"{v['short_p50_over_idle']} | {v['ttft_p50_s']} | {v['ttft_p99_s']} | "
                     f"{'-' if hits is None else hits} |")
    q, t = r["ratios"], r["prefix_cache_ttft"]
    lines += ["", "| measure | value | target |", "|---|---:|---|",
              f"| short p50 under load / idle (continuous) | {r['results']['continuous']['short_p50_over_idle']} | <= 2 |",
              f"| throughput, continuous / static | {q['throughput_continuous_over_static']} | >= 1 |",
              f"| short p50, static / continuous | {q['short_p50_static_over_continuous']} | - |",
              f"| TTFT of a `prompt` task ({t['template_head_tokens']}-token template head), prefix cache off -> on "
              f"| {t['ttft_p50_ms_cache_off']} -> {t['ttft_p50_ms_cache_on']} ms ({100 * t['reduction']:.0f}% lower) "
              f"| >= 30% lower |"]
    return "\n".join(lines)


def calibration(r: dict) -> str:
    rows = [[name, *(f"{v[d]:.3f}" for d in ("sst2", "trec"))] for name, v in r["results"].items()]
    return "\n".join([f"{r['eval_rows']} held-out rows per data set, zero-shot `template` modules; {r['machine']}.", "",
                      *markdown(["scoring", "SST-2", "TREC"], rows)])


def choices(r: dict) -> str:
    rows = [[name, f"{v['greedy']:.3f}", f"{v['choices']:.3f}"] for name, v in r["results"].items()]
    return "\n".join([f"{r['rows']} AG News rows, chance {r['chance']}; {r['machine']}.", "",
                      *markdown(["module", "greedy generation", "`choices`"], rows)])


def p3_idpt(r: dict) -> str:
    setups = list(r["results"])
    sets = sorted({d for v in r["results"].values() for d in v["scores"]})
    rows = [[d, *(f"{r['results'][n]['scores'].get(d, float('nan')):.1f}" for n in setups)] for d in sets]
    rows.append(["**average**", *(f"**{r['results'][n]['average']:.1f}**" for n in setups)])
    s = r["settings"]
    return "\n".join([f"P3 held-out ({r['held_out_rows']} rows), {s['steps']} steps x batch {s['batch_size']}; "
                      f"{r['machine']}.", "", *markdown(["data set", *setups], rows)])


def recursion(r: dict) -> str:
    rows = []
    for name, s in r["results"]["sst2"].items():
        q = r["results"]["squad"][name]
        rows.append([name, f"{s['accuracy']:.1f}", f"{q['exact_match']:.1f}", f"{q['f1']:.1f}",
                     f"{s['trainable_parameters']:,}", f"{s['latency_vs_base']:.2f} / {q['latency_vs_base']:.2f}"])
    return "\n".join([f"{r['machine']}.", "", *markdown(["set-up", "SST-2 acc", "SQuAD EM", "SQuAD F1", "trainable params",
                                                        "latency vs base (SST-2 / SQuAD)"], rows)])


def n_samples(r: dict) -> str:
    lines = [f"Embedded backbone ({r['backbone']}), one {r['prompt_tokens']}-token chat prompt, {r['n']} samples of "
             f"{r['new_tokens']} tokens each (temperature 0.8, top-p 0.95, EOS ignored), prefix cache off, median of "
             f"{r['repeats']} runs; {r['machine']}. Shared and separate samples are the same texts: "
             f"{'yes' if r['same_texts_shared_and_separate'] else 'NO'}.", "",
             "| setup | prefill positions | prefill s | wall s | prefill positions / n=1 | prefill s / n=1 | "
             "wall / n=1 |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"n1": "n = 1", "shared": f"n = {r['n']}, one request (one prefill)",
             "separate": f"{r['n']} separate requests"}
    for key, label in names.items():
        v = r["results"][key]
        q = r["ratios"].get(f"{key}_over_n1", {"prefill_positions": 1.0, "prefill_s": 1.0, "wall_s": 1.0})
        lines.append(f"| {label} | {v['prefill_positions']} | {v['prefill_s']} | {v['wall_s']} | "
                     f"{q['prefill_positions']} | {q['prefill_s']} | {q['wall_s']} |")
    lines += ["", f"Wall time, {r['n']} separate requests / one request with n = {r['n']}: "
                  f"{r['ratios']['separate_over_shared_wall_s']}."]
    return "\n".join(lines)


def constraint(r: dict) -> str:
    """bench/constraint.py: structured output's cost per decode step."""
    lines = [f"Embedded backbone ({r['backbone']}), {r['steps']} decode steps per setting, every row constrained "
             f"and sampled; grammar engine llguidance {r['llguidance']}; {r['machine']}. Constraint cost = token "
             f"masks + masking the logits + advancing the matchers, per step; ratio = that / an unconstrained "
             f"decode step of the running batch.", "",
             "| rows | constraint | step, free (ms) | masks (ms) | masks, parallel (ms) | masking (ms) | advance (ms) "
             "| constraint / step |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b, v in r["results"].items():
        for kind, k in v["constraints"].items():
            par = "-" if k["fill_ms_parallel"] is None else k["fill_ms_parallel"]
            lines.append(f"| {b} | {kind} | {k['free_step_ms']} | {k['fill_ms']} | {par} | {k['apply_ms']} | "
                         f"{k['advance_ms']} | {k['ratio']} |")
    comp = ", ".join(f"{k} {v} ms" for k, v in r["compile_ms"].items())
    lines += ["", f"Compile, cold (first mask included): {comp}; llguidance's tokenizer view, once per backbone: "
                  f"{r['tokenizer_ms']} ms."]
    return "\n".join(lines)


def fairness(r: dict) -> str:
    """bench/fairness.py: another task's requests behind one task's backlog, turns against FIFO."""
    lines = [f"Embedded backbone ({r['backbone']}), continuous engine with room for {r['max_running']} rows; task "
             f"`bulk` queues {r['bulk']} requests of n = {r['n']} x {r['tokens']} tokens, then task `other` sends an "
             f"8-token generation and a two-choice classification; median of {r['repeats']} interleaved runs; "
             f"{r['machine']}. Every request got the same answer under both policies: "
             f"{'yes' if r['same_answers'] else 'NO'}.", "",
             "| scheduler | `other`'s generation waits (s) | `other`'s classification waits (s) | `bulk` done after (s) |",
             "|---|---:|---:|---:|"]
    names = {"turns": "a line per task, in turns (the server's)", "fifo": "one FIFO line (the previous one)"}
    for key, label in names.items():
        v = r["results"][key]
        lines.append(f"| {label} | {v['short']} | {v['scored']} | {v['bulk_s']} |")
    q = r["fifo_over_turns"]
    lines.append(f"| FIFO / turns | {q['short']} | {q['scored']} | {q['bulk_s']} |")
    return "\n".join(lines)


TABLES = {"mixed_batch": mixed_batch, "sst2_http": sst2_http, "squad_rrr": squad_rrr, "continuous": continuous,
          "calibration": calibration, "choices": choices, "p3_idpt": p3_idpt, "recursion": recursion,
          "n_samples": n_samples, "constraint": constraint, "fairness": fairness}


if __name__ == "__main__":
    for name, fn in TABLES.items():
        path = RESULTS / f"{name}.json"
        if path.is_file():
            print(f"<!-- {name}: from bench/results/{name}.json -->")
            print(fn(json.loads(path.read_text())))
            print()
