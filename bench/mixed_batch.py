"""Mixed-task batching on the embedded backbone: tokens/s side by side, in one run.

(a) a batch of base rows; (b) all rows one LoRA; (c) 16 different modules of mixed kinds;
(c') 16 different LoRA modules through frozenlm's engine; (d) the same 16 LoRA modules through
PEFT's own `adapter_names` mixed batch; (e) a naive server that swaps PEFT adapters per request
(`set_adapter` + `generate`, one request at a time); plus the cold-load latency of a module
(read from the store, validated, put on the device). Every row generates exactly --new-tokens
tokens (EOS ignored), so every setup does the same work; every setup gets the same token ids.

    .venv/bin/python bench/mixed_batch.py [--rows 16] [--new-tokens 24] [--repeats 5]

Prints a table and writes bench/results/mixed_batch.json (the README table is made from it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine  # bench/common.py (the script's folder is on sys.path)
from tables import report  # bench/tables.py

from modules.core.backbone import Backbone
from modules.core.decode import GenItem, Sampling
from modules.core.running import generate
from modules.registry import kind_class

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a haiku about the sea.", "What is the capital of Italy?", "Give me three tips for sleeping well.",
           "Translate to French: I like apples.", "Explain what a prime number is.", "Name a famous painter.",
           "Summarize: the cat sat on the mat all day long.", "List two colors and a number."]
LORA_SPECS = [  # 16 different LoRA adapters: ranks 4-16, attention and MLP targets
    ({"q_proj", "v_proj"}, 8), ({"q_proj", "k_proj", "v_proj", "o_proj"}, 4), ({"gate_proj", "up_proj"}, 8),
    ({"down_proj"}, 16), ({"q_proj", "v_proj"}, 16), ({"o_proj", "down_proj"}, 4), ({"k_proj", "v_proj"}, 8),
    ({"q_proj", "v_proj", "up_proj"}, 4)] * 2


def _randomized(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def lora_modules(bb):
    return [_randomized(kind_class("lora").new(bb, {"targets": sorted(t), "r": r, "seed": i}), i)
            for i, (t, r) in enumerate(LORA_SPECS)]


def mixed_modules(bb):
    """16 modules: 6 LoRA, 4 prompt, 4 prefix, 2 composed (LoRA + prompt)."""
    mods = lora_modules(bb)[:6]
    mods += [_randomized(kind_class("prompt").new(bb, {"num_virtual_tokens": p, "seed": p}), 100 + p) for p in (4, 6, 8, 10)]
    mods += [_randomized(kind_class("prefix").new(bb, {"num_virtual_tokens": p, "seed": p}), 200 + p) for p in (4, 6, 8, 10)]
    parts = [{"kind": "lora", "config": {"r": 4}}, {"kind": "prompt", "config": {"num_virtual_tokens": 4}}]
    mods += [_randomized(kind_class("compose").new(bb, {"parts": parts}), 300 + i) for i in range(2)]
    return [m.eval().requires_grad_(False) for m in mods]


def rows_for(modules, n: int, new_tokens: int) -> list[GenItem]:
    items = []
    for i in range(n):
        m = modules[i % len(modules)]
        ids = m.encode(PROMPTS[i % len(PROMPTS)])
        items.append(GenItem(ids, m.contribution(ids), Sampling(max_new_tokens=new_tokens, ignore_eos=True)))
    return items


def interleaved(fns: dict, repeats: int, once: set[str]) -> dict[str, tuple[float, int]]:
    """Median seconds and tokens per setup. Setups run round-robin (after one warm-up each), so
    drift on a shared machine hits every setup alike; those in `once` run in the first round only."""
    tokens = {k: fn() for k, fn in fns.items() if k not in once}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            if k in once and r:
                continue
            start = time.perf_counter()
            tokens[k] = fn()
            times[k].append(time.perf_counter() - start)
    return {k: (statistics.median(v), tokens[k]) for k, v in times.items()}


def ours(bb, modules, n, new_tokens):
    items = rows_for(modules, n, new_tokens)

    def run():
        with torch.inference_mode():
            return sum(len(g.token_ids) for g in generate(bb, items))
    return run


def peft_model_with(bb, loras, folder: Path):
    """A PEFT model over a second copy of the backbone holding the same 16 LoRA adapters."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(bb.model.config._name_or_path, dtype=bb.dtype).eval()
    model = None
    for i, m in enumerate(loras):
        cfg = LoraConfig(r=m.config.r, lora_alpha=m.config.alpha, target_modules=list(m.config.targets))
        name = f"a{i}"
        model = get_peft_model(base, cfg, adapter_name=name) if model is None else model
        if i:
            model.add_adapter(name, cfg)
        sd = {}
        for key in m.scale:
            slot = key.replace(".", "__")
            sd[f"base_model.model.model.{key}.lora_A.{name}.weight"] = m.A[slot].detach()
            sd[f"base_model.model.model.{key}.lora_B.{name}.weight"] = m.B[slot].detach()
        missing = set(sd) - set(model.state_dict())
        assert not missing, sorted(missing)[:3]
        model.load_state_dict(sd, strict=False)
    assert isinstance(model, PeftModel)
    return model.eval()


def peft_mixed(model, tok, n, new_tokens):
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    names = [f"a{i % 16}" for i in range(n)]

    def run():
        with torch.inference_mode():
            out = model.generate(**batch, adapter_names=names, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        return _count_new(out[:, batch["input_ids"].shape[1]:], tok)
    return run


def peft_naive(model, tok, n, new_tokens):
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]

    def run():
        total = 0
        with torch.inference_mode():
            for i, text in enumerate(texts):
                model.set_adapter(f"a{i % 16}")
                ids = tok(text, return_tensors="pt")
                out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                total += _count_new(out[:, ids["input_ids"].shape[1]:], tok)
        return total
    return run


def _count_new(new_ids: torch.Tensor, tok) -> int:
    """Generated tokens (every row generates exactly new_tokens: EOS is suppressed everywhere)."""
    return new_ids.numel()


def cold_loads(bb, n: int) -> list[float]:
    from service.loaded import LoadedModules
    from service.store import ModuleStore

    with tempfile.TemporaryDirectory() as d:
        reg = LoadedModules(ModuleStore(d), bb, cache_bytes=1)  # a 1-byte cache: every resolve is a cold load
        for i, m in enumerate(mixed_modules(bb)):
            reg.put(f"m{i}", m.to_artifact())
        times = []
        for k in range(n):
            reg._loaded.clear()
            start = time.perf_counter()
            reg.resolve(f"m{k % 16}")
            times.append(time.perf_counter() - start)
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mixed_batch.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = Backbone.load()
    n, t = args.rows, args.new_tokens
    loras = lora_modules(bb)
    setups = {
        # the same token ids everywhere: no chat template (as PEFT's runs get them)
        "a_base": ("(a) all base", ours(bb, [kind_class("template").new(bb)], n, t)),
        "b_one_lora": ("(b) all one LoRA (r=8, q,v)", ours(bb, loras[:1], n, t)),
        "c_mixed16": ("(c) 16 modules, mixed kinds", ours(bb, mixed_modules(bb), n, t)),
        "c_lora16": ("(c') 16 LoRA modules, frozenlm", ours(bb, loras, n, t)),
    }
    with tempfile.TemporaryDirectory() as d:
        model = peft_model_with(bb, loras, Path(d))
        setups["d_peft_mixed"] = ("(d) 16 LoRA, PEFT adapter_names", peft_mixed(model, bb.tokenizer, n, t))
        setups["e_naive_swap"] = ("(e) PEFT set_adapter per request", peft_naive(model, bb.tokenizer, n, t))
        measured = interleaved({k: fn for k, (_, fn) in setups.items()}, args.repeats, once={"e_naive_swap"})
        results = {}
        for key, (label, _) in setups.items():
            seconds, tokens = measured[key]
            results[key] = {"label": label, "seconds": round(seconds, 3), "tokens": tokens,
                            "tokens_per_s": round(tokens / seconds, 1)}
            print(f"{label:36} {tokens / seconds:8.1f} tok/s  ({tokens} tokens in {seconds:.2f}s)", flush=True)
    cold = cold_loads(bb, 48)
    tps = {k: v["tokens_per_s"] for k, v in results.items()}
    ratios = {"c_over_a": round(tps["c_mixed16"] / tps["a_base"], 3),
              "c_over_e": round(tps["c_mixed16"] / tps["e_naive_swap"], 2),
              "c_lora16_over_d": round(tps["c_lora16"] / tps["d_peft_mixed"], 2),
              "lora_overhead_b_vs_a": round(1 - tps["b_one_lora"] / tps["a_base"], 3)}
    cold_ms = {"p50": round(statistics.median(cold) * 1e3, 1),
               "p95": round(sorted(cold)[int(0.95 * (len(cold) - 1))] * 1e3, 1)}
    out = {"machine": machine(bb),
           "backbone": bb.name, "rows": n, "new_tokens": t, "results": results, "ratios": ratios,
           "cold_load_ms": cold_ms}
    report("mixed_batch", out, args.out)


if __name__ == "__main__":
    main()
