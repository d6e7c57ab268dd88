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
BATCH_SECONDS = Histogram("frozenlm_batch_seconds", "Engine time per batch.", registry=REGISTRY)


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


def render() -> bytes:
    return generate_latest(REGISTRY)
