"""Rows whose contribution depends on a backbone pass over their own input (ID-PT, recursive LM).

Most modules know their contribution from the token ids alone. A *probing* module first needs the
backbone to look at the input: the hidden states of some layer over a row it builds (ID-PT's
encoder, the recursive LM's first pass, rrr's reranker rows), or a few sampled continuations
(textual recursion). `prepare` runs the probes of every row of a batch together - one hidden-state
pass that stops at the deepest layer any row asked for, one generate call for all sampled
candidates - then lets each module finish its rows: the (ids, contribution) of the row's final
pass, which joins the batch like any other row.

What a row needs between its probe and its finish travels with the row: `module.probe(ids,
context)` returns a `Probe` whose `state` (e.g. the passages rrr retrieved) is handed back to
`module.finish(ids, results, state)`. What a request brings besides its ids (its task's documents)
is its `Context`, given with the row: a loaded module is shared by every request and never changed.

Example::

    rows = prepare(backbone, [(module_a, ids_a), (idpt_module, ids_b)])   # [Prepared(ids, contribution), ...]
    rows = prepare(backbone, [(rrr_module, ids, Context(documents=corpus))])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from modules.core.batch import Contribution, Row, build_pass
from modules.core.decode import GenItem, Sampling
from modules.core.running import generate


@dataclass(frozen=True)
class Context:
    """What one request brings to its module's probe besides its token ids.

    documents: the task's documents, for a kind that reads them (rrr): anything with
               `search(query, k, method) -> [(Document, score), ...]` and `len()`; None: none
    """

    documents: object | None = None


NO_CONTEXT = Context()


@dataclass(frozen=True)
class Probe:
    """The backbone passes a module needs before its row can run.

    rows:     the rows to run (token ids and a contribution, e.g. an encoder soft prompt); a
              reranker asks for one row per candidate passage
    depth:    read the hidden states after this many decoder layers (num_layers = the final,
              normed states); used when `sampling` is None
    sampling: generate `n` continuations of each row instead (seeds seed, seed+1, ...)
    state:    anything the module needs again in `finish` (it gets it back with the results)
    """

    rows: list[Row]
    depth: int = 0
    sampling: Sampling | None = None
    n: int = 1
    state: object = None


@dataclass
class Prepared:
    """A row ready for the final pass, and what its module wants the caller to see (`info`,
    e.g. the passages a reader was given)."""

    ids: list[int]
    contribution: Contribution | None
    info: dict | None = None
    error: Exception | None = None  # this row's module failed while preparing it; the others go on


def prepare(backbone, requests: list[tuple], isolate: bool = False) -> list[Prepared]:
    """The final row of each (module, ids) or (module, ids, context) request; the probes of all
    requests run batched.

    A module's `finish(ids, results, state)` gets one result per probe row: hidden states
    (len(row), H), or a list of n sampled texts, and its probe's `state`. Differentiable when called
    with gradients on (the trainer). `isolate=True` (the server): a module that fails on its own
    row gives that row an `error` and the other rows are prepared as usual; otherwise the first
    such error is raised."""
    requests = [(r[0], r[1], (r[2] if len(r) > 2 else None) or NO_CONTEXT) for r in requests]
    probes, failed = [], {}
    for i, (module, ids, context) in enumerate(requests):
        try:
            probes.append(module.probe(ids, context))
        except Exception as e:  # noqa: BLE001 - one module's fault stays with its own row
            probes.append(None)
            failed[i] = e
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
        generated = generate(backbone, items)
        at = 0
        for i, j in sampled:
            mine = generated[at:at + probes[i].n]
            results[i][j] = [g.text for g in mine]
            failed.update({i: g.error for g in mine if g.error is not None})
            at += probes[i].n
    out = [Prepared(ids, None, error=failed[i]) if i in failed else _finish(module, ids, probe, result)
           for i, ((module, ids, _), probe, result) in enumerate(zip(requests, probes, results))]
    errors = [p.error for p in out if p.error is not None]
    if errors and not isolate:
        raise errors[0]
    return out


def _finish(module, ids: list[int], probe: Probe | None, result: list) -> Prepared:
    """The row's final pass from its probe results and state (or from its ids alone); a failure
    stays in the row."""
    try:
        if probe is None:
            return Prepared(ids, module.contribution(ids))
        done = module.finish(ids, result, probe.state)
        return done if isinstance(done, Prepared) else Prepared(*done)
    except Exception as e:  # noqa: BLE001 - one module's fault stays with its own row
        return Prepared(ids, None, error=e)
