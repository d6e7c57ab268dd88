"""The `frozenlm` command line: serve, tasks, upload, delete, infer, train, blackbox, documents.

`serve`, `train` and `blackbox` import the server and the trainer lazily, so the client commands stay light
(and `clients/` never imports torch at module level).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _client(args):
    from clients.client import Client

    return Client(args.url, api_key=args.api_key, timeout=args.timeout)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def cmd_serve(args) -> int:
    from service.app import run

    run(host=args.host, port=args.port)
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        ready = c.ready()
    print("ready" if ready else "not ready")
    return 0 if ready else 1


def cmd_metrics(args) -> int:
    with _client(args) as c:
        print(c.metrics(), end="")
    return 0


def cmd_backbone(args) -> int:
    with _client(args) as c:
        _print(c.backbone())
    return 0


def cmd_tasks(args) -> int:
    with _client(args) as c:
        for t in c.list_tasks():
            metrics = ", ".join(f"{k}={v}" for k, v in t.metrics.items() if k.startswith("eval_"))
            print(f"{t.name:24} v{t.version:<4} {t.kind:10} {t.status:11} {metrics}")
    return 0


def cmd_show(args) -> int:
    with _client(args) as c:
        _print(c.get_task(args.name).raw)
    return 0


def cmd_upload(args) -> int:
    with _client(args) as c:
        up = c.upload(args.name, args.file, progress=sys.stderr.isatty())
    print(f"uploaded {up.name} v{up.version} ({up.kind}, {up.size_bytes} bytes, sha256 {up.sha256[:12]})")
    return 0


def cmd_delete(args) -> int:
    with _client(args) as c:
        c.delete(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_infer(args) -> int:
    params = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
                                "stop": args.stop, "choices": args.choice,
                                "logprobs": args.logprobs, "n": args.n, "regex": args.regex,
                                "json_schema": _json_arg(args.json_schema, "--json-schema")}.items() if v is not None}
    with _client(args) as c:
        res = c.infer(args.name, args.text, **params)
    if args.json:
        _print(res.raw)
    else:
        for i, out in enumerate(res.outputs):
            if args.n and args.n > 1:
                print(f"[{i}]", end=" ")
            if out.label is not None:
                scores = ", ".join(f"{k}={v:.3f}" for k, v in (out.scores or {}).items())
                print(f"{out.label}\t({scores})")
            else:
                print(out.text)
            _print_logprobs(out.logprobs)
    return 0


def _json_arg(value: str | None, option: str):
    """An option's JSON, given inline or as @FILE."""
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option} is not JSON: {e}") from None


def _print_logprobs(tokens) -> None:
    """One line per generated token: its text, logprob, and its step's alternatives."""
    for t in tokens or ():
        top = "  ".join(f"{a.token!r} {a.logprob:.4f}" for a in t.top_logprobs)
        print(f"  {t.token!r}\t{t.logprob:.4f}" + (f"\t[{top}]" if top else ""))


def _labels(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    if value.lstrip().startswith("{"):
        return json.loads(value)
    return {name: f" {name}" for name in value.split(",")}


def cmd_train(args) -> int:
    from pathlib import Path

    from modules.core.artifact import read_artifact
    from modules.registry import load_module
    from modules.training.train import TrainOptions, lm_rows, mix, read_jsonl, train_module

    if bool(args.data) == bool(args.lm_text):
        print("give --data (JSONL, repeatable with :weight) or --lm-text (plain text), not both", file=sys.stderr)
        return 2
    if args.lm_text:
        rows = lm_rows(Path(args.lm_text).read_text(encoding="utf-8").splitlines(), seed=args.seed)
    elif len(args.data) == 1:
        rows = read_jsonl(args.data[0])
    else:
        sources = []
        for spec in args.data:
            path, _, weight = spec.rpartition(":")
            try:
                sources.append((read_jsonl(path), float(weight)))
            except ValueError:  # no ":WEIGHT" (or a path with a colon in it)
                sources.append((read_jsonl(spec), 1.0))
        rows = mix(sources, (args.max_steps or sum(len(r) for r, _ in sources) // args.batch_size) * args.batch_size,
                   args.seed)
    eval_rows = _eval_rows(args)
    backbone = _backbone(args)
    manifest = _manifest(args)
    options = TrainOptions(max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed, child_tuning=args.child_tuning,
                           reserve_p=args.reserve_p, fisher_batches=args.fisher_batches or None,
                           fisher_warmup_steps=args.fisher_warmup_steps)
    init = load_module(read_artifact(Path(args.init).read_bytes()), backbone) if args.init else None
    result = train_module(backbone, args.kind, rows, options, eval_rows=eval_rows, init=init,
                          config=json.loads(args.config) if args.config else None, **manifest)
    return _write(args.out, result)


def cmd_blackbox(args) -> int:
    """Black-box tuning (CMA-ES over a projected soft prompt, forward passes only): in process, or
    through a running service with `--url` given after the command (language-model-as-a-service)."""
    from modules.training.blackbox import BlackBoxOptions, blackbox_tune, blackbox_tune_http
    from modules.training.train import read_jsonl

    rows = read_jsonl(args.data)
    eval_rows = _eval_rows(args)
    opts = BlackBoxOptions(intrinsic_dim=args.intrinsic_dim, popsize=args.popsize, generations=args.generations,
                           sigma=args.sigma, alpha=args.alpha, bound=args.bound, loss=args.loss, seed=args.seed,
                           batch_size=args.batch_size)
    config = json.loads(args.config) if args.config else {}
    if args.num_virtual_tokens is not None:
        config["num_virtual_tokens"] = args.num_virtual_tokens
    manifest = _manifest(args)
    if args.service:
        from clients.client import Client

        backbone = None if args.embedding_std is not None else _backbone(args)
        with Client(args.service, api_key=args.service_key or args.api_key, timeout=args.timeout) as c:
            result = blackbox_tune_http(c, rows, opts, eval_rows, config, backbone=backbone,
                                        embedding_std=args.embedding_std, scratch_task=args.scratch_task,
                                        **manifest)
    else:
        result = blackbox_tune(_backbone(args), rows, opts, eval_rows, config, **manifest)
    return _write(args.out, result)


def _module_arguments(s: argparse.ArgumentParser) -> None:
    """The new module's manifest and the local backbone (train, blackbox); read by `_manifest`
    and `_backbone`."""
    s.add_argument("--template", default="{input}", help="input template with {input}")
    s.add_argument("--chat", action="store_true", help="wrap the template in the chat template")
    s.add_argument("--labels", help="label verbalizers: JSON object, or a comma list (verbalizer = ' name')")
    s.add_argument("--description", default="")
    s.add_argument("--backbone", help="local backbone source (default: FROZENLM_BACKBONE or the embedded one)")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")


def _eval_rows(args) -> list[dict] | None:
    from modules.training.train import read_jsonl

    rows = read_jsonl(args.eval) if args.eval else None
    return rows[:args.eval_limit] if args.eval_limit and rows else rows


def _write(out: str, result) -> int:
    """A trained module's artifact to `out`, its metrics to stdout."""
    from pathlib import Path

    Path(out).write_bytes(result.artifact)
    _print(result.metrics)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _manifest(args) -> dict:
    manifest = {"template": args.template, "chat": args.chat, "description": args.description}
    if args.labels:
        manifest["labels"] = _labels(args.labels)
    return manifest


def _backbone(args):
    from modules.core.backbone import Backbone

    return Backbone.load(args.backbone or os.environ.get("FROZENLM_BACKBONE") or None,
                         device=args.device, dtype=args.dtype)


# --- documents -------------------------------------------------------------------------------------


def cmd_documents_add(args) -> int:
    """Post a .jsonl file's documents, then follow the indexing job with a progress bar."""
    from tqdm.auto import tqdm

    with _client(args) as c:
        job = c.add_documents(args.name, args.file)
        print(f"stored {job.count} documents of {args.name} ({job.added} added, {job.replaced} replaced); "
              f"job {job.id}", file=sys.stderr)
        if args.no_wait:
            _print(job.raw)
            return 0
        with tqdm(total=job.total or None, unit="doc", desc="indexing", disable=args.quiet) as bar:
            def follow(j):
                bar.total = j.total or bar.total
                bar.n = j.done
                bar.set_postfix_str(j.status)
                bar.refresh()

            job = c.wait_documents(args.name, job.id, poll=args.poll, on_progress=follow)
    what = "dense vectors computed" if job.dense else "BM25 index ready (no dense vectors needed)"
    print(f"indexed: {job.count} documents, {what} (job {job.id})")
    return 0


def cmd_documents_job(args) -> int:
    with _client(args) as c:
        _print(c.documents_job(args.name, args.job).raw)
    return 0


def cmd_documents_list(args) -> int:
    with _client(args) as c:
        page = c.list_documents(args.name, args.offset, args.limit)
    print(f"{page['count']} documents", file=sys.stderr)
    for d in page["documents"]:
        print(json.dumps(d, ensure_ascii=False))
    return 0


def cmd_documents_search(args) -> int:
    with _client(args) as c:
        for hit in c.search_documents(args.name, args.query, args.k, args.method):
            print(f"{hit['score']:.4f}\t{hit['id']}\t{hit.get('title') or ''}")
    return 0


def cmd_documents_delete(args) -> int:
    with _client(args) as c:
        c.delete_documents(args.name)
    print(f"deleted every document of {args.name}")
    return 0


def _documents_parser(sub) -> None:
    d = sub.add_parser("documents", help="a task's documents: add (and follow the indexing), list, search, delete")
    dsub = d.add_subparsers(dest="documents_command", required=True)
    s = dsub.add_parser("add", help="add or replace documents from a JSON-lines file {id, text, title?} and "
                                    "follow the indexing job with a progress bar")
    s.add_argument("name")
    s.add_argument("file", help="JSON lines, one {\"id\", \"text\", \"title\"?} a line")
    s.add_argument("--no-wait", action="store_true", help="print the job and return without following it")
    s.add_argument("--poll", type=float, default=0.5, help="seconds between two looks at the job")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_documents_add)
    s = dsub.add_parser("job", help="one indexing job: status and progress")
    s.add_argument("name")
    s.add_argument("job")
    s.set_defaults(func=cmd_documents_job)
    s = dsub.add_parser("list", help="the task's documents, one JSON object a line")
    s.add_argument("name")
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--limit", type=int, default=100)
    s.set_defaults(func=cmd_documents_list)
    s = dsub.add_parser("search", help="search the task's documents")
    s.add_argument("name")
    s.add_argument("query")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--method", choices=["bm25", "dense", "hybrid"], default="hybrid")
    s.set_defaults(func=cmd_documents_search)
    s = dsub.add_parser("delete", help="delete every document of the task")
    s.add_argument("name")
    s.set_defaults(func=cmd_documents_delete)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="frozenlm", description="One frozen LM, many task modules.")
    p.add_argument("--url", default=os.environ.get("FROZENLM_URL", "http://127.0.0.1:8000"),
                   help="server URL (env FROZENLM_URL)")
    p.add_argument("--api-key", default=os.environ.get("FROZENLM_API_KEY"), help="bearer key (env FROZENLM_API_KEY)")
    p.add_argument("--timeout", type=float, default=120.0, help="request timeout in seconds")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the server (settings from FROZENLM_* env)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    sub.add_parser("health", help="exit 0 when the server is ready (GET /readyz)").set_defaults(func=cmd_health)
    sub.add_parser("metrics", help="the Prometheus metrics").set_defaults(func=cmd_metrics)
    sub.add_parser("tasks", help="list tasks").set_defaults(func=cmd_tasks)
    sub.add_parser("backbone", help="the server's backbone: name, sizes, fingerprint, device").set_defaults(
        func=cmd_backbone)
    s = sub.add_parser("show", help="one task's manifest")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("upload", help="upload (or replace) a task module artifact")
    s.add_argument("name")
    s.add_argument("file")
    s.set_defaults(func=cmd_upload)

    s = sub.add_parser("delete", help="delete a task")
    s.add_argument("name")
    s.set_defaults(func=cmd_delete)

    s = sub.add_parser("infer", help="run a task on a text")
    s.add_argument("name")
    s.add_argument("text")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--choice", action="append",
                   help="an answer choice, scored as a continuation (repeatable; rank classification)")
    s.add_argument("--logprobs", type=int, metavar="K",
                   help="print each generated token's logprob and its K most likely alternatives (0-20)")
    s.add_argument("-n", type=int, help="samples of the input (1-16), sharing one prefill; sample i seeded seed + i")
    s.add_argument("--json-schema", metavar="SCHEMA",
                   help="structured output: the text is JSON valid against this schema (JSON, or @FILE)")
    s.add_argument("--regex", help="structured output: the text matches this regular expression in full")
    s.add_argument("--json", action="store_true", help="print the whole response")
    s.set_defaults(func=cmd_infer)

    s = sub.add_parser("train", help="train a module on JSONL rows {input, target|label}")
    s.add_argument("kind", help="module kind, e.g. prompt")
    s.add_argument("--data", action="append",
                   help="training JSONL; repeat as FILE:WEIGHT to train on a mixture (sampled by weight)")
    s.add_argument("--lm-text", help="plain text, one document per line: language-modelling rows "
                                     "(e.g. pre-training a recursive module's connector)")
    s.add_argument("--init", help="start from this artifact's weights (same kind)")
    s.add_argument("--eval", help="evaluation JSONL")
    s.add_argument("--eval-limit", type=int, help="evaluate on the first N eval rows only")
    s.add_argument("--out", required=True, help="artifact to write (.zip)")
    s.add_argument("--max-steps", type=int)
    s.add_argument("--epochs", type=float, help="passes over the data (default: 1 unless --max-steps)")
    s.add_argument("--lr", type=float, default=3e-2)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--config", help="the kind's config as JSON, e.g. '{\"num_virtual_tokens\": 16}'; "
                                    "kind sparse: '{\"targets\": [\"q_proj\", \"v_proj\"], \"reserve_p\": 0.01}' "
                                    "picks the positions by Fisher information (Child-Tuning_D)")
    s.add_argument("--child-tuning", choices=["F", "D"],
                   help="Child-Tuning: F = a fresh random gradient mask each step, D = a fixed mask of the "
                        "parameters with the largest Fisher information")
    s.add_argument("--reserve-p", type=float, default=0.3,
                   help="Child-Tuning: the fraction of gradient entries kept (default 0.3)")
    s.add_argument("--fisher-batches", type=int, default=8,
                   help="batches the Fisher information is estimated on (Child-Tuning D, kind sparse); "
                        "0 = every training row once (default 8)")
    s.add_argument("--fisher-warmup-steps", type=int, default=10,
                   help="Child-Tuning D: plain AdamW steps taken (then undone) before the Fisher estimate, so "
                        "tensors behind a zero-initialised output (LoRA's A) get a gradient (default 10)")
    _module_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("blackbox", help="black-box tuning of a soft prompt (CMA-ES, forward passes only) on "
                                        "JSONL rows {input, label}; writes a prompt module")
    s.add_argument("--data", required=True, help="training JSONL, classification rows {input, label}")
    s.add_argument("--eval", help="evaluation JSONL")
    s.add_argument("--eval-limit", type=int, help="evaluate on the first N eval rows only")
    s.add_argument("--out", required=True, help="artifact to write (.zip, a prompt module)")
    s.add_argument("--url", dest="service",
                   help="score candidates through this running frozenlm server (its HTTP API, admin key "
                        "needed: candidates are uploaded to a scratch task); default: in process")
    s.add_argument("--api-key", dest="service_key", help="bearer key for --url (default: the global --api-key)")
    s.add_argument("--embedding-std", type=float,
                   help="with --url: std of the served model's embedding table; then no local backbone is "
                        "loaded and the initial prompt is zero (pure language-model-as-a-service)")
    s.add_argument("--scratch-task", help="with --url: the scratch task's name (default bbt-<random>)")
    s.add_argument("--num-virtual-tokens", type=int, help="prompt length P (default 16, or --config's)")
    s.add_argument("--config", help="the prompt kind's config as JSON (num_virtual_tokens, init, ...)")
    s.add_argument("--intrinsic-dim", type=int, default=500, help="d, the size of z (default 500)")
    s.add_argument("--popsize", type=int, default=20, help="CMA-ES candidates per generation (default 20)")
    s.add_argument("--generations", type=int, default=100, help="CMA-ES generations (default 100)")
    s.add_argument("--sigma", type=float, default=1.0, help="CMA-ES initial step size")
    s.add_argument("--alpha", type=float, default=1.0, help="scale of the random projection")
    s.add_argument("--bound", type=float, help="box constraint |z_i| <= bound (default none)")
    s.add_argument("--loss", choices=["ce", "hinge"], default="ce")
    s.add_argument("--batch-size", type=int, default=32, help="rows per backbone pass / per request")
    s.add_argument("--seed", type=int, default=0)
    _module_arguments(s)
    s.set_defaults(func=cmd_blackbox)
    _documents_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clients.client import FrozenLMError

    try:
        return args.func(args)
    except FrozenLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
