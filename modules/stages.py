"""Rows whose contribution depends on a backbone pass over their own input (ID-PT, recursive LM).

Most modules know their contribution from the token ids alone. A *probing* module first needs the
backbone to look at the input: the hidden states of some layer over a row it builds (ID-PT's
encoder, the recursive LM's first pass), or a few sampled continuations (textual recursion).
`prepare` runs the probes of every row of a batch together - one hidden-state pass that stops at
the deepest layer any row asked for, one generate call for all sampled candidates - then lets each
module finish its rows: the (ids, contribution) of the row's final pass, which joins the batch like
any other row.

Example::

    rows = prepare(backbone, [(module_a, ids_a), (idpt_module, ids_b)])   # [Prepared(ids, contribution), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modules.batch import Contribution, Row, build_pass
from modules.decode import GenItem, Sampling, generate


@dataclass(frozen=True)
class Probe:
    """The backbone passes a module needs before its row can run.

    rows:     the rows to run (token ids and a contribution, e.g. an encoder soft prompt); a
              reranker asks for one row per candidate passage
    depth:    read the hidden states after this many decoder layers (num_layers = the final,
              normed states); used when `sampling` is None
    sampling: generate `n` continuations of each row instead (seeds seed, seed+1, ...)
    """

    rows: list[Row]
    depth: int = 0
    sampling: Sampling | None = None
    n: int = 1


@dataclass
class Prepared:
    """A row ready for the final pass, and what its module wants the caller to see (`info`,
    e.g. the passages a reader was given)."""

    ids: list[int]
    contribution: Contribution
    info: dict | None = None


def prepare(backbone, requests: list[tuple[object, list[int]]]) -> list[Prepared]:
    """The final row of each (module, ids) request; the probes of all requests run batched.

    A module's `finish(ids, results)` gets one result per probe row: hidden states (len(row), H),
    or a list of n sampled texts. Differentiable when called with gradients on (the trainer)."""
    probes = [module.probe(ids) for module, ids in requests]
    results: list[list] = [[None] * len(p.rows) if p is not None else [] for p in probes]
    hidden = [(i, j) for i, p in enumerate(probes) if p is not None and p.sampling is None for j in range(len(p.rows))]
    if hidden:
        rows = [probes[i].rows[j] for i, j in hidden]
        p = build_pass(backbone, rows)
        states = backbone.hidden_states(p.embeds, p.mask, p.positions, {probes[i].depth for i, _ in hidden},
                                        p.cache, p.deltas)
        for b, ((i, j), row) in enumerate(zip(hidden, rows)):
            results[i][j] = states[probes[i].depth][b, p.embeds.shape[1] - len(row):]    # (len(row), H)
    sampled = [(i, j) for i, p in enumerate(probes) if p is not None and p.sampling is not None
               for j in range(len(p.rows))]
    if sampled:
        items = []
        for i, j in sampled:
            s, row = probes[i].sampling, probes[i].rows[j]
            items += [GenItem(row.ids, row.contribution, replace(s, seed=None if s.seed is None else s.seed + k))
                      for k in range(probes[i].n)]
        texts = [g.text for g in generate(backbone, items)]
        at = 0
        for i, j in sampled:
            results[i][j] = texts[at:at + probes[i].n]
            at += probes[i].n
    out = []
    for (module, ids), probe, result in zip(requests, probes, results):
        if probe is None:
            out.append(Prepared(ids, module.contribution(ids)))
        else:
            done = module.finish(ids, result)
            out.append(done if isinstance(done, Prepared) else Prepared(*done))
    return out
