"""Retrieve-rerank-read on SQuAD (../shared/data/squad: 24 articles of SQuAD v1.1 dev).

Every paragraph of the 24 articles is one document of the retrieval corpus. Articles 3, 7, 11, 15,
19 and 23 are held out: their questions are only evaluated on; training questions come from the
other 18 articles (a seeded sample). One run:

1. retrieval: BM25 over the corpus, and dense vectors from the frozen backbone (cached on disk
   by backbone fingerprint and corpus hash; they also ship in the example artifact);
2. reranker: for each training question, the gold paragraph and the retriever's best other
   paragraphs (hard negatives) are encoded jointly with the question (passage, then question) by
   the frozen backbone's first layers, once, under no_grad (only the head trains); the head
   (LayerNorm + Linear, plus a weight on the retrieval-rank prior) is trained with cross-entropy
   over each group. The depth (`--depths`, one pass to the deepest), the pooling (the question's
   positions, the last one, or all) and whether the prior is used are chosen on a validation
   slice (a quarter) of the training questions;
3. reader: a soft prompt trained (prompt tuning, backbone frozen) on question + packed context ->
   answer, contexts packed as served (reranked, under the token budget), the gold paragraph moved
   first when the served context misses the answer;
4. evaluation on held-out questions, through the module's own probe/finish path:
   closed-book base (the backbone alone, a QA template), retrieve-read (the rrr module with
   `rerank: false`), retrieve-rerank-read; exact match and F1 (SQuAD normalisation, max over the
   gold answers); recall in context (a gold answer string inside the packed context) for the
   retriever alone vs retriever + reranker; retrieval latency (ms/query).

Writes bench/results/squad_rrr.json and the example artifact examples/tasks/squad-rrr.zip (module,
all 1,048 paragraphs and their dense vectors).

    .venv/bin/python bench/squad_rrr.py                                  # the real run
    .venv/bin/python bench/squad_rrr.py --train-questions 24 --eval-questions 8 --reader-steps 2 \\
        --no-dense --out /tmp/rrr.json --artifact /tmp/rrr.zip           # smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import exact_match, f1, machine, normalize  # bench/common.py (the script's folder is on sys.path)
from tables import squad_rrr as squad_rrr_table  # bench/tables.py (the script's folder is on sys.path)
from tqdm.auto import tqdm

from modules.core.backbone import Backbone
from modules.core.batch import Contribution, Row, build_pass
from modules.core.decode import GenItem, Sampling, ScoreItem, score
from modules.core.retrieval import Document, Retriever, documents_files
from modules.core.running import generate
from modules.core.stages import Context, prepare
from modules.kinds.rrr import Candidate, Corpus, RRRModule, pack
from modules.registry import kind_class

ROOT = Path(__file__).resolve().parent.parent
SQUAD = ROOT.parent / "shared" / "data" / "squad" / "dev-v1.1.part1of2.json"
HELD_OUT = (3, 7, 11, 15, 19, 23)
CLOSED_BOOK = "Answer the question in a few words.\nQuestion: {input}\nAnswer:"


# --- data ----------------------------------------------------------------------------------------


def load_squad(path: Path = SQUAD):
    """(documents, questions): one document per paragraph; questions {"q", "answers", "doc", "article"}."""
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    docs, questions = [], []
    for a, article in enumerate(data):
        title = article["title"].replace("_", " ")
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"{a:02d}-{p:03d}"
            docs.append(Document(doc_id, para["context"], title))
            for qa in para["qas"]:
                answers = list(dict.fromkeys(x["text"].strip() for x in qa["answers"]))
                questions.append({"q": qa["question"].strip(), "answers": answers, "doc": doc_id, "article": a})
    return docs, questions


def em_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    return exact_match(prediction, answers), f1(prediction, answers)


def answer_in(context: str, answers: list[str]) -> bool:
    c = normalize(context)
    return any(normalize(a) and normalize(a) in c for a in answers)


# --- dense vectors, cached -----------------------------------------------------------------------


def retriever_for(backbone, docs, dense: bool, cache_dir: Path) -> Retriever:
    """BM25 always; with `dense`, vectors as the server's DocumentStore makes them (max_tokens 256),
    embedded once and cached by backbone fingerprint and corpus hash."""
    if not dense:
        return Retriever().build(docs)
    h = hashlib.sha256("".join(d.digest for d in docs).encode()).hexdigest()[:16]
    path = cache_dir / f"squad-vectors-{backbone.info.fingerprint}-{h}.npy"
    if path.is_file():
        return Retriever(backbone, progress=False).build(docs, vectors=np.load(path))
    r = Retriever(backbone, batch_size=16, max_tokens=256).build(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, r.vectors())
    return r


# --- reranker ------------------------------------------------------------------------------------


def training_group(module: RRRModule, corpus: Corpus, q: dict, k: int) -> list[Candidate]:
    """The gold paragraph and the retriever's best k-1 other paragraphs (hard negatives), each with
    its true retrieval rank (the gold's found in the top 100, else 100)."""
    hits = corpus.search(q["q"], 100, module.config.retrieval)
    gold_rank = next((r for r, (d, _) in enumerate(hits) if d.id == q["doc"]), len(hits))
    gold_score = hits[gold_rank][1] if gold_rank < len(hits) else 0.0
    negatives = [Candidate(d, s, r) for r, (d, s) in enumerate(hits) if d.id != q["doc"]][: k - 1]
    gold = Candidate(corpus.by_id[q["doc"]], gold_score, gold_rank)
    return sorted([gold, *negatives], key=lambda c: c.rank)


POOLS = ("question", "last", "mean")


@torch.no_grad()
def encode_groups(backbone, module: RRRModule, questions, groups, depths: list[int], batch: int = 16):
    """Pooled reranker features of every (question, candidate) at each depth, with each pooling
    (one pass, to the deepest): {(depth, pool): (Q, K, H)}."""
    tails = [module.tail_length(q["q"]) for q in questions]
    rows = [(qi, ci, module.rerank_ids(q["q"], c.doc))
            for qi, (q, g) in enumerate(zip(questions, groups)) for ci, c in enumerate(g)]
    rows.sort(key=lambda r: -len(r[2]))  # little padding
    K = max(len(g) for g in groups)
    out = {(d, p): torch.zeros(len(questions), K, backbone.hidden_size) for d in depths for p in POOLS}
    for i in tqdm(range(0, len(rows), batch), desc="rerank features", leave=False):
        chunk = rows[i:i + batch]
        p = build_pass(backbone, [Row(ids) for _, _, ids in chunk])
        states = backbone.hidden_states(p.embeds, p.mask, p.positions, set(depths))  # {depth: (B, L, H)}
        L = p.embeds.shape[1]
        for d in depths:
            for b, (qi, ci, ids) in enumerate(chunk):
                s = states[d][b, L - len(ids):].float()                                  # (T, H)
                for pool in POOLS:
                    module.config = module.config.model_copy(update={"pool": pool})
                    out[(d, pool)][qi, ci] = module.features(s, tails[qi])
    return out


def train_head(module: RRRModule, X: torch.Tensor, ranks: torch.Tensor, gold: torch.Tensor, steps: int,
               lr: float, weight_decay: float, prior: bool = True) -> list[float]:
    """Fit the head (norm, linear, prior weight) on cached features (Q, K, H): cross-entropy over
    each group's scores, full batch."""
    params = [*module.norm.parameters(), *module.head.parameters()]
    with torch.no_grad():
        module.head.weight.zero_()
        module.head.bias.zero_()
        module.prior_weight.fill_(1.0 if prior else 0.0)
        module.norm.reset_parameters()
    if prior:
        params.append(module.prior_weight)
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    Q, K, H = X.shape
    losses = []
    for _ in range(steps):
        s = module.score(X.reshape(Q * K, H), ranks.reshape(-1)).reshape(Q, K)
        loss = torch.nn.functional.cross_entropy(s, gold)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for p in module.parameters():
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def top1(module: RRRModule, X, ranks, gold) -> float:
    Q, K, H = X.shape
    s = module.score(X.reshape(Q * K, H), ranks.reshape(-1)).reshape(Q, K)
    return float((s.argmax(-1) == gold).float().mean())


# --- packing, as the module does it --------------------------------------------------------------


def context_text(module: RRRModule, ordered: list[Document]) -> str:
    """The packed context's text for documents in final order (what `module.read` packs)."""
    tok = module.tokenizer
    passages = [tok(d.passage, add_special_tokens=False)["input_ids"] for d in ordered]
    sep = tok(module.config.separator, add_special_tokens=False)["input_ids"] if module.config.separator else []
    taken = pack([len(p) for p in passages], module.config.context_tokens, len(sep))
    return module.config.separator.join(tok.decode(p[:n]) for p, n in zip(passages, taken) if n)


# --- reader --------------------------------------------------------------------------------------


def reader_rows(module: RRRModule, corpus: Corpus, questions, groups, X, ranks):
    """(question, reader ids, target) for training: served order (reranked), packed; when that
    context misses the answer, the gold paragraph goes first."""
    Q, K, H = X.shape
    with torch.no_grad():
        scores = module.score(X.reshape(Q * K, H), ranks.reshape(-1)).reshape(Q, K)
    rows = []
    for qi, (q, g) in enumerate(zip(questions, groups)):
        order = sorted(range(len(g)), key=lambda i: (-float(scores[qi, i]), g[i].rank))
        ordered = [g[i] for i in order]
        if not answer_in(context_text(module, [c.doc for c in ordered]), q["answers"]):
            ordered = sorted(ordered, key=lambda c: c.doc.id != q["doc"])
        if not answer_in(context_text(module, [c.doc for c in ordered]), q["answers"]):
            continue  # the answer lies past the budget in a long gold paragraph
        ids, _ = module.read(q["q"], ordered)
        rows.append((ids, q["answers"][0]))
    return rows


def train_reader(backbone, module: RRRModule, rows, steps: int, batch: int, lr: float, seed: int = 0):
    tok = backbone.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    targets = [tok(" " + a, add_special_tokens=False)["input_ids"] + eos for _, a in rows]
    module.reader_prompt.requires_grad_(True)
    opt = torch.optim.AdamW([module.reader_prompt], lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm)))
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="train reader", leave=False)
    for _ in bar:
        if len(order) < batch:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order += fresh
        pick, order = order[:batch], order[batch:]
        items = [ScoreItem(rows[i][0], Contribution(prepend=module.reader_prompt), [targets[i]]) for i in pick]
        lls = score(backbone, items)
        loss = torch.stack([-ll[0] / len(targets[i]) for i, ll in zip(pick, lls)]).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([module.reader_prompt], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{statistics.mean(losses[-10:]):.3f}")
    module.reader_prompt.requires_grad_(False)
    return losses


# --- evaluation ----------------------------------------------------------------------------------


@torch.inference_mode()
def run_setup(backbone, module, questions, batch: int, max_new_tokens: int, corpus: Corpus | None = None):
    """Answers through the module's own path (probes, finish, generate); per question: prediction,
    EM, F1, and for rrr modules the packed context's recall and the gold paragraph's rank."""
    out = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(questions), batch), desc=f"eval {module.kind}", leave=False):
        chunk = questions[i:i + batch]
        rows = prepare(backbone, [(module, module.encode(q["q"]), Context(corpus)) for q in chunk])
        gens = generate(backbone, [GenItem(r.ids, r.contribution, Sampling(max_new_tokens=max_new_tokens, stop=["\n"]))
                                   for r in rows])
        for q, r, g in zip(chunk, rows, gens):
            em, f = em_f1(g.text.strip(), q["answers"])
            rec = {"prediction": g.text.strip(), "em": em, "f1": f}
            if r.info is not None:
                passages = r.info["passages"]
                ids = [p["id"] for p in passages]
                used = [corpus.by_id[p["id"]] for p in passages if p["used"]]
                rec["in_context"] = answer_in(context_text(module, used), q["answers"])  # used keep their order
                rec["gold_rank"] = ids.index(q["doc"]) if q["doc"] in ids else None
                rec["gold_used"] = any(p["id"] == q["doc"] and p["used"] for p in passages)
            out.append(rec)
    return out, time.perf_counter() - start


def summarize(records) -> dict:
    s = {"exact_match": round(100 * statistics.mean(r["em"] for r in records), 1),
         "f1": round(100 * statistics.mean(r["f1"] for r in records), 1)}
    if "in_context" in records[0]:
        s["recall_in_context"] = round(100 * statistics.mean(r["in_context"] for r in records), 1)
        s["gold_paragraph_in_context"] = round(100 * statistics.mean(r["gold_used"] for r in records), 1)
        s["gold_paragraph_top1"] = round(100 * statistics.mean(r["gold_rank"] == 0 for r in records), 1)
    return s


def latency(corpus: Corpus, questions, methods, repeats: int = 1) -> dict:
    out = {}
    for method in methods:
        times = []
        for _ in range(repeats):
            for q in questions:
                t = time.perf_counter()
                corpus.search(q["q"], 8, method)
                times.append(1000 * (time.perf_counter() - t))
        out[method] = {"median_ms": round(statistics.median(times), 2), "mean_ms": round(statistics.mean(times), 2),
                       "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))], 2)}
    return out


def recall_at(corpus: Corpus, questions, methods, k: int) -> dict:
    return {m: round(100 * statistics.mean(any(d.id == q["doc"] for d, _ in corpus.search(q["q"], k, m))
                                           for q in questions), 1) for m in methods}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-questions", type=int, default=600)
    ap.add_argument("--eval-questions", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--retrieval", default="bm25", choices=["bm25", "dense", "hybrid"])
    ap.add_argument("--depths", default="10", help="reranker depths to choose from (on a validation slice)")
    ap.add_argument("--rerank-passage-tokens", type=int, default=160)
    ap.add_argument("--context-tokens", type=int, default=192)
    ap.add_argument("--reader-prompt-tokens", type=int, default=16)
    ap.add_argument("--head-steps", type=int, default=600)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--head-weight-decay", type=float, default=0.1)
    ap.add_argument("--reader-steps", type=int, default=60)
    ap.add_argument("--reader-batch", type=int, default=4)
    ap.add_argument("--reader-lr", type=float, default=0.03)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="embed the corpus (cached): dense/hybrid latency and recall, vectors in the artifact")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "frozenlm" / "bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "squad_rrr.json"))
    ap.add_argument("--artifact", default=str(ROOT / "examples" / "tasks" / "squad-rrr.zip"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.monotonic()
    timings = {}

    backbone = Backbone.load()
    docs, questions = load_squad()
    rng = random.Random(args.seed)
    train_pool = [q for q in questions if q["article"] not in HELD_OUT]
    eval_pool = [q for q in questions if q["article"] in HELD_OUT]
    train_q = rng.sample(train_pool, min(args.train_questions, len(train_pool)))
    eval_q = rng.sample(eval_pool, min(args.eval_questions, len(eval_pool)))

    t = time.monotonic()
    retriever = retriever_for(backbone, docs, args.dense, Path(args.cache_dir))
    corpus = Corpus(retriever, docs)
    timings["retriever_s"] = round(time.monotonic() - t, 1)
    methods = ["bm25", "dense", "hybrid"] if args.dense else ["bm25"]

    depths = [int(d) for d in args.depths.split(",")]
    config = {"retrieval": args.retrieval, "candidates": args.candidates, "reranker_depth": depths[0],
              "rerank_passage_tokens": args.rerank_passage_tokens, "context_tokens": args.context_tokens,
              "reader_prompt_tokens": args.reader_prompt_tokens,
              "init_text": "Answer with a few words copied from the context.", "seed": args.seed}
    manifest = {"template": "{input}", "generation": {"max_new_tokens": args.max_new_tokens, "stop": ["\n"]},
                "description": "Retrieve-rerank-read over the 1,048 paragraphs of SQuAD v1.1 dev articles 0-23 "
                               "(BM25 top 8, a reranker head on the frozen backbone's joint encoding, a "
                               "prompt-tuned reader)"}
    module = RRRModule.new(backbone, config, **manifest)

    # reranker: features once (every depth and pooling in one pass), then the head; depth, pooling
    # and the retrieval-rank prior are picked on a validation slice of the training questions
    t = time.monotonic()
    groups = [training_group(module, corpus, q, args.candidates) for q in train_q]
    feats = encode_groups(backbone, module, train_q, groups, depths)
    ranks = torch.tensor([[c.rank for c in g] for g in groups])
    gold = torch.tensor([[c.doc.id for c in g].index(q["doc"]) for q, g in zip(train_q, groups)])
    timings["rerank_features_s"] = round(time.monotonic() - t, 1)
    n_val = max(1, len(train_q) // 4)
    fit, val = slice(n_val, None), slice(0, n_val)
    selection = {"retriever_top1": round(100 * float((ranks[val].argmin(-1) == gold[val]).float().mean()), 1)}
    for (depth, pool), X in feats.items():
        for prior in (True, False):
            module.config = module.config.model_copy(update={"pool": pool})
            train_head(module, X[fit], ranks[fit], gold[fit], args.head_steps, args.head_lr,
                       args.head_weight_decay, prior)
            selection[f"depth {depth}, {pool}{'' if prior else ', no prior'}"] = round(
                100 * top1(module, X[val], ranks[val], gold[val]), 1)
    choice = max(((d, p, prior) for d, p in feats for prior in (True, False)),
                 key=lambda c: selection[f"depth {c[0]}, {c[1]}{'' if c[2] else ', no prior'}"])
    depth, pool, prior = choice
    config.update(reranker_depth=depth, pool=pool)
    module = RRRModule.new(backbone, config, **manifest)
    head_losses = train_head(module, feats[(depth, pool)], ranks, gold, args.head_steps, args.head_lr,
                             args.head_weight_decay, prior)
    timings["rerank_head_s"] = round(time.monotonic() - t - timings["rerank_features_s"], 1)

    # reader
    t = time.monotonic()
    rows = reader_rows(module, corpus, train_q, groups, feats[(depth, pool)], ranks)
    reader_losses = train_reader(backbone, module, rows, args.reader_steps, args.reader_batch, args.reader_lr, args.seed)
    timings["reader_s"] = round(time.monotonic() - t, 1)

    # evaluation
    t = time.monotonic()
    closed = kind_class("template").new(backbone, template=CLOSED_BOOK)
    plain = RRRModule.from_tensors(module.manifest.model_copy(update={"config": {**module.config.model_dump(),
                                                                                   "rerank": False}}),
                                   module.tensors(), backbone)
    results = {}
    for name, m in (("closed-book base", closed), ("retrieve-read", plain), ("retrieve-rerank-read", module)):
        records, seconds = run_setup(backbone, m, eval_q, args.eval_batch, args.max_new_tokens, corpus)
        results[name] = {**summarize(records), "seconds": round(seconds, 1),
                         "examples": [{"q": q["q"], "answers": q["answers"], **r} for q, r in zip(eval_q[:5], records[:5])]}
    timings["eval_s"] = round(time.monotonic() - t, 1)
    lat = latency(corpus, eval_q, methods)
    rec = recall_at(corpus, eval_q, methods, args.candidates)

    module.eval()
    metrics = {"eval_articles": list(HELD_OUT), "eval_questions": len(eval_q),
               **{f"{k.replace('-', '_').replace(' ', '_')}_{m}": v for k, r in results.items()
                  for m, v in r.items() if m in ("exact_match", "f1", "recall_in_context")}}
    files = documents_files(docs, retriever if args.dense else None)
    artifact = module.to_artifact(files=files, metrics=metrics)
    Path(args.artifact).write_bytes(artifact)

    out = {"machine": machine(backbone),
           "backbone": backbone.name, "settings": vars(args), "config": module.config.model_dump(),
           "reranker_depth": module.depth, "corpus_documents": len(docs), "train_questions": len(train_q), "reader_rows": len(rows),
           "eval_questions": len(eval_q), "held_out_articles": list(HELD_OUT),
           "reranker_selection": {"chosen": {"depth": depth, "pool": pool, "prior": prior},
                                  "validation_questions": n_val, "top1": selection}, "head_loss": [round(head_losses[0], 4), round(head_losses[-1], 4)],
           "reader_loss": [round(statistics.mean(reader_losses[:5]), 4), round(statistics.mean(reader_losses[-5:]), 4)],
           "results": results, "retrieval_latency_ms": lat, f"retrieval_recall_at_{args.candidates}": rec,
           "artifact_bytes": len(artifact), "timings": {**timings, "total_s": round(time.monotonic() - t_start, 1)}}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(squad_rrr_table(out))


if __name__ == "__main__":
    main()
