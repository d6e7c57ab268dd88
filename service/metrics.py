"""Prometheus metrics (served at /metrics)."""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

REQUESTS = Counter("frozenlm_requests_total", "Inference requests by task, kind and outcome.",
                   ["task", "kind", "outcome"], registry=REGISTRY)
LATENCY = Histogram("frozenlm_request_seconds", "Inference latency by task and kind.", ["task", "kind"],
                    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
QUEUE_DEPTH = Gauge("frozenlm_queue_depth", "Jobs waiting for the engine.", registry=REGISTRY)
BATCH_ROWS = Histogram("frozenlm_batch_rows", "Rows per engine batch.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
TOKENS = Counter("frozenlm_generated_tokens_total", "Tokens generated.", registry=REGISTRY)
CANCELLED = Counter("frozenlm_cancelled_rows_total", "Rows dropped because their request went away "
                    "(client disconnect or deadline): before they ran or mid-decoding.", registry=REGISTRY)
BATCH_SECONDS = Histogram("frozenlm_batch_seconds", "Engine time per batch.", registry=REGISTRY)
MODULE_CACHE = Gauge("frozenlm_module_cache_events", "Module cache events since start: hits, warm_loads (from the "
                     "CPU tier), cold_loads (from the store), evictions.", ["event"], registry=REGISTRY)
MODULES_LOADED = Gauge("frozenlm_modules_loaded", "Modules on the device.", registry=REGISTRY)
MODULE_BYTES = Gauge("frozenlm_module_bytes", "Bytes of modules on the device.", registry=REGISTRY)
DEVICE_MEMORY = Gauge("frozenlm_device_memory_bytes", "Memory allocated on the CUDA device (0 on CPU).",
                      registry=REGISTRY)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TTFT = Histogram("frozenlm_time_to_first_token_seconds", "From queueing to a generation row's first token.",
                 ["task", "kind"], buckets=_STEP_BUCKETS, registry=REGISTRY)
ITL = Histogram("frozenlm_inter_token_seconds", "Between two tokens of a generation row (one engine step).",
                ["task", "kind"], buckets=_STEP_BUCKETS, registry=REGISTRY)
RUNNING_ROWS = Gauge("frozenlm_running_rows", "Rows in the running batch (decoding, or waiting for their prefill).",
                     registry=REGISTRY)
KV_TOKENS = Gauge("frozenlm_kv_tokens", "Key/value positions the running rows hold.", registry=REGISTRY)
PREFIX_CACHE = Gauge("frozenlm_prefix_cache", "Prefix cache: lookups since start that hit or missed, and the "
                     "tokens it holds.", ["event"], registry=REGISTRY)


def observe_step(batch, seconds: float, decoded: list, first: list) -> None:
    """One step of the continuous engine: `decoded` are the jobs that got a next token in it,
    `first` those that got their first."""
    RUNNING_ROWS.set(len(batch))
    KV_TOKENS.set(batch.tokens)
    if batch.prefix_cache is not None:
        for event in ("hits", "misses", "tokens"):
            PREFIX_CACHE.labels(event).set(getattr(batch.prefix_cache, event))
    now = time.monotonic()
    for j in decoded:
        ITL.labels(j.task, j.module.kind).observe(seconds)
    for j in first:
        TTFT.labels(j.task, j.module.kind).observe(now - j.enqueued)


@contextmanager
def track(task: str, kind: str):
    start = time.monotonic()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        REQUESTS.labels(task, kind, outcome).inc()
        LATENCY.labels(task, kind).observe(time.monotonic() - start)


def observe_batch(jobs, results, seconds: float) -> None:
    BATCH_ROWS.observe(len(jobs))
    BATCH_SECONDS.observe(seconds)
    TOKENS.inc(sum(len(getattr(r, "token_ids", ())) for r in results))
    CANCELLED.inc(sum(getattr(r, "finish_reason", None) == "cancelled" for r in results))


def render(runtime) -> bytes:
    if runtime.ready:
        QUEUE_DEPTH.set(runtime.scheduler.depth)
        for event, n in runtime.loaded.stats.items():
            MODULE_CACHE.labels(event).set(n)
        MODULES_LOADED.set(runtime.loaded.loaded_count)
        MODULE_BYTES.set(runtime.loaded.loaded_bytes)
        if runtime.backbone.device.type == "cuda":
            import torch

            DEVICE_MEMORY.set(torch.cuda.memory_allocated(runtime.backbone.device))
    return generate_latest(REGISTRY)
