"""Retrieval over a set of documents: BM25, dense vectors from the frozen backbone, and their fusion.

Example::

    r = Retriever(backbone).build([Document("p1", "Paris is the capital of France.", "Paris"), ...])
    r.search("capital of France", k=5, method="hybrid")   # [("p1", 0.0328), ...]
    r.save(folder)
    r = Retriever.load(folder, backbone, docs)              # docs: to rebuild what is stale

The three methods:

- `bm25`: rank_bm25.BM25Okapi (k1=1.5, b=0.75, epsilon=0.25) over `words(title + " " + text)`, where
  `words` lowercases and keeps every run of Unicode word characters (regex `\\w+`: letters, digits,
  underscore), so "Rhône-Alpes, 1960s" -> ["rhône", "alpes", "1960s"]. No stemming, no stop words:
  BM25's idf already weighs common words down, and exact rare words are what BM25 is for. Only
  documents that share at least one word with the query are ranked.
- `dense`: a document's vector is the mean, over its tokens (the first `max_tokens`), of the
  backbone's final hidden state (after the final norm), optionally mapped by a small learned linear
  projection (H -> d), then L2-normalised; FAISS `IndexFlatIP` over unit vectors is exact cosine
  search. Queries are embedded the same way (same pooling, same projection).
- `hybrid`: reciprocal-rank fusion of the two rankings, score(d) = sum over rankings of
  1 / (60 + rank(d)), ranks from 1, each ranking cut at `max(k, 100)` (Cormack, Clarke & Buettcher,
  2009). RRF uses ranks only, so it needs no calibration between BM25 scores (unbounded) and cosines
  (in [-1, 1]); k = 60 is the paper's constant: it flattens the head of each list, so that a
  document both methods rank well beats one that a single method ranks first.

Persistence (`save`/`load`), never pickle: `retriever.json` (manifest: format, backbone fingerprint,
settings, document ids in order and a hash of each document), `bm25.json` (the tokenised corpus;
BM25's statistics are recomputed from it on load), `dense.faiss` (faiss.write_index) and, when
there is one, `projection.safetensors` (`projection.weight` (d, H), `projection.bias` (d)).
A dense index whose fingerprint is not the running backbone's is rebuilt from the documents, not used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("frozenlm.retrieval")

FORMAT = "frozenlm.retriever/1"
MANIFEST_FILE = "retriever.json"
BM25_FILE = "bm25.json"
DENSE_FILE = "dense.faiss"
PROJECTION_FILE = "projection.safetensors"
METHODS = ("bm25", "dense", "hybrid")

WORD = re.compile(r"\w+")
BM25_PARAMS = {"k1": 1.5, "b": 0.75, "epsilon": 0.25}
RRF_K = 60
FUSION_DEPTH = 100       # each ranking is cut here (or at k, if larger) before fusion
CHARS_PER_TOKEN_CAP = 16  # a text is cut at max_tokens * 16 characters before tokenising (bounds the work)


@dataclass(frozen=True)
class Document:
    """One passage: an id, its text and an optional title."""

    id: str
    text: str
    title: str | None = None

    @property
    def passage(self) -> str:
        """What the dense encoder reads: the title on its own line, then the text."""
        return f"{self.title}\n{self.text}" if self.title else self.text

    @property
    def digest(self) -> str:
        """A hash of the title and text: the same document keeps its vector across rebuilds."""
        return hashlib.sha256(json.dumps([self.title, self.text]).encode()).hexdigest()[:16]


def words(text: str) -> list[str]:
    """BM25's tokenisation: lowercase, then runs of Unicode word characters."""
    return WORD.findall(text.lower())


# --- dense vectors -----------------------------------------------------------------------------


def embed_texts(backbone, texts: Sequence[str], batch_size: int = 16, max_tokens: int = 256, *,
                lock=None, progress: bool = True) -> np.ndarray:
    """Mean-pooled final hidden states of the frozen backbone, one float32 row per text. -> (N, H)

    Texts are cut to their first `max_tokens` tokens and sorted by length so a batch pads little.
    Rows are right-padded: in a causal model real tokens never attend to the pads after them, so a
    text's vector does not depend on the batch it lands in. `lock` (a threading.Lock, or None) is
    held around each batch's forward pass, so these passes never overlap another thread's passes on
    the same backbone (the backbone keeps the running pass's per-row deltas on itself). A text with
    no tokens gets a zero vector."""
    from tqdm.auto import tqdm

    tok = backbone.tokenizer
    cut = [t[: max_tokens * CHARS_PER_TOKEN_CAP] for t in texts]
    # No truncation/padding arguments: those would reconfigure the shared fast tokenizer, which
    # other threads are using; the ids are cut here instead.
    ids = [row[:max_tokens] for row in tok(cut, add_special_tokens=False)["input_ids"]] if cut else []
    out = np.zeros((len(ids), backbone.hidden_size), dtype=np.float32)
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", disable=not progress or len(starts) < 2):
        rows = order[start:start + batch_size]
        B, T = len(rows), len(ids[rows[0]])  # longest first
        tokens = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, i in enumerate(rows):
            tokens[b, : len(ids[i])] = torch.tensor(ids[i])
            mask[b, : len(ids[i])] = 1
        positions = torch.arange(T).expand(B, T)  # (B, T): right padding, every row starts at 0
        with lock if lock is not None else contextlib.nullcontext(), torch.inference_mode():
            hidden = backbone.forward(backbone.embed(tokens), mask.to(backbone.device),
                                      positions.to(backbone.device))  # (B, T, H)
            m = mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
            pooled = (hidden.float() * m).sum(1) / m.sum(1)  # (B, H)
        out[rows] = pooled.cpu().numpy()
    return out


def save_projection(linear: nn.Linear, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {"projection.weight": linear.weight.detach().float().cpu().contiguous()}
    if linear.bias is not None:
        tensors["projection.bias"] = linear.bias.detach().float().cpu().contiguous()
    save_file(tensors, str(path))


def load_projection(path: str | Path) -> nn.Linear:
    """An nn.Linear (H -> d) from `projection.weight` (d, H) and an optional `projection.bias` (d)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    weight = tensors.get("projection.weight")
    bias = tensors.get("projection.bias")
    if weight is None or weight.ndim != 2 or set(tensors) - {"projection.weight", "projection.bias"}:
        raise ValueError(f"{path}: expected projection.weight (d, H) and an optional projection.bias (d)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{path}: projection.bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _projection_digest(linear: nn.Linear | None) -> str | None:
    if linear is None:
        return None
    h = hashlib.sha256()
    for p in (linear.weight, linear.bias):
        if p is not None:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal-rank fusion: {item: sum over rankings of 1 / (k + rank)}, ranks from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


# --- the retriever -----------------------------------------------------------------------------


class Retriever:
    """BM25 and dense search over one list of documents.

    `backbone=None` gives a BM25-only retriever. `projection` is an nn.Linear (H -> d) applied to
    query and document vectors (identity when None). `lock` is held around each backbone pass
    (see `embed_texts`). After `load`, `rebuilt` says whether anything had to be rebuilt.

        r = Retriever(backbone).build(docs)
        hits = r.search("rare words", k=3, method="bm25")   # [(doc_id, score), ...] best first
    """

    def __init__(self, backbone=None, projection: nn.Linear | None = None, *, batch_size: int = 16,
                 max_tokens: int = 256, lock=None, progress: bool = True):
        if projection is not None and backbone is not None and projection.in_features != backbone.hidden_size:
            raise ValueError(f"projection takes {projection.in_features} features; the backbone's hidden "
                             f"size is {backbone.hidden_size}")
        self.backbone, self.projection = backbone, projection
        self.batch_size, self.max_tokens, self.lock, self.progress = batch_size, max_tokens, lock, progress
        self.ids: list[str] = []
        self.digests: list[str] = []
        self.corpus: list[list[str]] = []
        self.bm25 = None
        self.postings: dict[str, list[int]] = {}
        self.index = None  # faiss.IndexFlatIP, or None without a backbone
        self.rebuilt = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int | None:
        if self.backbone is None:
            return None
        return self.projection.out_features if self.projection is not None else self.backbone.hidden_size

    # --- building ------------------------------------------------------------------------------

    def build(self, docs: Sequence[Document], reuse: "Retriever | None" = None,
              vectors: np.ndarray | None = None, dense: bool = True) -> "Retriever":
        """Index `docs` (ids must be unique). `reuse`: a previous retriever on the same backbone and
        projection, whose vectors are kept for documents that did not change (only the rest is embedded).
        `vectors` (N, d): the documents' dense vectors as this retriever computes them (`vectors()`),
        saved earlier: nothing is embedded (an example task ships them). `dense=False`: BM25 only
        (no backbone pass); `with_vectors` adds the dense index later."""
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be unique")
        self.ids, self.digests = ids, [d.digest for d in docs]
        self._set_bm25([words(f"{d.title} {d.text}" if d.title else d.text) for d in docs])
        if self.backbone is not None and (dense or vectors is not None):
            if vectors is not None:
                self._set_vectors(vectors)
            else:
                self._build_dense(docs, reuse)
        return self

    def _set_vectors(self, vectors: np.ndarray) -> None:
        import faiss

        if vectors.shape != (len(self.ids), self.dim) or not np.isfinite(vectors).all():
            raise ValueError(f"vectors must be finite, of shape ({len(self.ids)}, {self.dim}); "
                             f"got {tuple(vectors.shape)}")
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).copy()
        norms = np.linalg.norm(vecs, axis=1)
        off = np.abs(norms - 1) > 1e-5  # vectors() gives unit rows: kept bit for bit
        vecs[off] /= np.maximum(norms[off], 1e-12)[:, None]
        self.index = faiss.IndexFlatIP(self.dim)
        if len(vecs):
            self.index.add(vecs)

    def with_vectors(self, vectors: np.ndarray) -> "Retriever":
        """A retriever on the same documents and BM25 index, with `vectors` (N, d) (as `embed` makes
        them, in document order) as its dense index. This one is not changed."""
        r = Retriever(self.backbone, self.projection, batch_size=self.batch_size, max_tokens=self.max_tokens,
                      lock=self.lock, progress=self.progress)
        r.ids, r.digests, r.corpus, r.bm25, r.postings = self.ids, self.digests, self.corpus, self.bm25, self.postings
        r._set_vectors(vectors)
        return r

    def by_digest(self) -> dict[str, np.ndarray]:
        """The dense vector of each document, keyed by its digest (title and text: what was embedded);
        {} without a dense index."""
        if self.index is None:
            return {}
        return {h: self.index.reconstruct(i) for i, h in enumerate(self.digests)}

    def vectors(self) -> np.ndarray | None:
        """The dense index's vectors, in document order (N, d); None without a backbone."""
        if self.index is None:
            return None
        return np.stack([self.index.reconstruct(i) for i in range(len(self.ids))]) if self.ids else \
            np.zeros((0, self.dim), dtype=np.float32)

    def _set_bm25(self, corpus: list[list[str]]) -> None:
        from rank_bm25 import BM25Okapi

        self.corpus = corpus
        # BM25Okapi divides by the corpus size and the vocabulary size: no model for an empty one.
        self.bm25 = BM25Okapi(corpus, **BM25_PARAMS) if any(corpus) else None
        postings: dict[str, list[int]] = {}
        for i, toks in enumerate(corpus):
            for w in set(toks):
                postings.setdefault(w, []).append(i)
        self.postings = postings

    def embed(self, texts: Sequence[str], lock_held: bool = False) -> np.ndarray:
        """Embed, project, L2-normalise: the dense vectors of texts, as documents and queries get
        them. -> (N, d) float32. `lock_held`: the caller holds `lock` (the engine thread)."""
        import faiss

        vecs = embed_texts(self.backbone, texts, self.batch_size, self.max_tokens,
                           lock=None if lock_held else self.lock, progress=self.progress)  # (N, H)
        if self.projection is not None:
            with torch.inference_mode():
                vecs = self.projection.float().cpu()(torch.from_numpy(vecs)).numpy()  # (N, d)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        faiss.normalize_L2(vecs)  # in place; a zero row stays zero
        return vecs

    def reusable(self, other: "Retriever | None") -> bool:
        """Whether `other`'s vectors are this retriever's (same backbone, projection and token cut)."""
        return (other is not None and other.index is not None and other.backbone is not None
                and other.backbone.info.fingerprint == self.backbone.info.fingerprint
                and _projection_digest(other.projection) == _projection_digest(self.projection)
                and other.max_tokens == self.max_tokens)

    def _build_dense(self, docs: Sequence[Document], reuse: "Retriever | None") -> None:
        import faiss

        vecs = np.zeros((len(docs), self.dim), dtype=np.float32)  # (N, d)
        todo = list(range(len(docs)))
        if self.reusable(reuse):
            old = {(i, h): j for j, (i, h) in enumerate(zip(reuse.ids, reuse.digests))}
            todo = []
            for n, d in enumerate(docs):
                j = old.get((d.id, d.digest))
                if j is None:
                    todo.append(n)
                else:
                    vecs[n] = reuse.index.reconstruct(j)
        if todo:
            vecs[todo] = self.embed([docs[n].passage for n in todo])
        self.index = faiss.IndexFlatIP(self.dim)
        if len(docs):
            self.index.add(vecs)

    # --- searching -----------------------------------------------------------------------------

    def search(self, query: str, k: int = 10, method: str = "hybrid", *,
               lock_held: bool = False) -> list[tuple[str, float]]:
        """The best `k` documents for `query`, best first, as (doc_id, score).

        Scores: BM25's for `bm25`, cosine for `dense`, the RRF sum for `hybrid`. `bm25` returns only
        documents that share a word with the query; `dense` and `hybrid` return min(k, len(self)).
        `lock_held`: the caller holds `lock` already (the engine thread, in a module's probe), so
        embedding the query does not take it again."""
        if method not in METHODS:
            raise ValueError(f"unknown retrieval method {method!r}; known: {', '.join(METHODS)}")
        if k < 1:
            raise ValueError("k must be at least 1")
        if method != "bm25" and self.index is None:
            raise ValueError(f"method {method!r} needs a dense index: this retriever has none")
        if not self.ids:
            return []
        if method == "bm25":
            ranked = self._bm25(query, k)
        elif method == "dense":
            ranked = self._dense(query, k, lock_held)
        else:
            depth = max(k, FUSION_DEPTH)
            fused = rrf([[i for i, _ in self._bm25(query, depth)],
                         [i for i, _ in self._dense(query, depth, lock_held)]])
            ranked = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(self.ids[i], float(s)) for i, s in ranked]

    def _bm25(self, query: str, k: int) -> list[tuple[int, float]]:
        q = words(query)
        candidates = sorted({i for w in q for i in self.postings.get(w, ())})
        if not candidates or self.bm25 is None:
            return []
        scores = self.bm25.get_batch_scores(q, candidates)
        return sorted(zip(candidates, scores), key=lambda kv: (-kv[1], kv[0]))[:k]

    def _dense(self, query: str, k: int, lock_held: bool = False) -> list[tuple[int, float]]:
        q = self.embed([query], lock_held)  # (1, d)
        scores, idx = self.index.search(q, min(k, len(self.ids)))  # (1, k) each
        return [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if i >= 0]

    # --- persistence ---------------------------------------------------------------------------

    def manifest(self) -> dict:
        dense = None
        if self.index is not None:
            dense = {"pooling": "mean", "normalize": "l2", "metric": "inner_product", "index": "IndexFlatIP",
                     "hidden_size": self.backbone.hidden_size, "dim": self.dim, "max_tokens": self.max_tokens,
                     "projection": _projection_digest(self.projection)}
        return {
            "format": FORMAT,
            "backbone_fingerprint": self.backbone.info.fingerprint if self.index is not None else None,
            "bm25": {"tokenizer": "lowercase, regex \\w+", "fields": "title + text", **BM25_PARAMS},
            "dense": dense,
            "hybrid": {"fusion": "rrf", "k": RRF_K, "depth": FUSION_DEPTH},
            "ids": self.ids,
            "digests": self.digests,
        }

    def save(self, folder: str | Path) -> None:
        """Write the retriever into `folder` (created if needed), every file fsynced. Writing into a
        fresh folder and renaming it into place makes the whole save atomic (service/documents/store.py does)."""
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        _write(folder / BM25_FILE, lambda p: p.write_text(json.dumps({"corpus": self.corpus})))
        if self.index is not None:
            _write(folder / DENSE_FILE, lambda p: faiss.write_index(self.index, str(p)))
        if self.projection is not None:
            _write(folder / PROJECTION_FILE, lambda p: save_projection(self.projection, p))
        _write(folder / MANIFEST_FILE, lambda p: p.write_text(json.dumps(self.manifest())))  # last

    @classmethod
    def load(cls, folder: str | Path, backbone=None, docs: Sequence[Document] | None = None, *,
             rebuild: bool = True, **kwargs) -> "Retriever":
        """Read a saved retriever. With `docs` (the documents it should describe, in order), whatever
        does not match them is rebuilt: everything when the ids or contents differ, the dense index when
        it was built on another backbone (its fingerprint differs) or is missing. Without `docs` such an
        index raises ValueError. `rebuild=False`: nothing is built; documents that differ raise
        ValueError and a dense index that is missing or made on another backbone is left out (`index`
        None), so loading never runs the backbone. kwargs: batch_size, max_tokens, lock, progress
        (max_tokens defaults to the saved one). A projection saved with the index is used only on the
        same backbone."""
        import faiss

        folder = Path(folder)
        meta = json.loads((folder / MANIFEST_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a retriever ({meta.get('format')!r}, expected {FORMAT!r})")
        dense = meta.get("dense")
        same_backbone = (backbone is not None and dense is not None
                         and meta.get("backbone_fingerprint") == backbone.info.fingerprint)
        projection = None
        if same_backbone and dense.get("projection"):
            projection = load_projection(folder / PROJECTION_FILE)
        kwargs.setdefault("max_tokens", (dense or {}).get("max_tokens", 256))
        r = cls(backbone, projection, **kwargs)

        if docs is not None and ([d.id for d in docs] != meta["ids"] or [d.digest for d in docs] != meta["digests"]):
            if not rebuild:
                raise ValueError(f"index in {folder} does not describe these documents")
            log.warning("index in %s does not describe these documents: rebuilding it", folder)
            r.build(docs)
            r.rebuilt = True
            return r
        r.ids, r.digests = list(meta["ids"]), list(meta["digests"])
        corpus = json.loads((folder / BM25_FILE).read_text())["corpus"]
        if len(corpus) != len(r.ids):
            raise ValueError(f"{folder}: bm25 corpus has {len(corpus)} documents, the manifest {len(r.ids)}")
        r._set_bm25(corpus)
        if backbone is None:
            return r
        if same_backbone and (folder / DENSE_FILE).is_file():
            index = faiss.read_index(str(folder / DENSE_FILE))
            if index.ntotal == len(r.ids) and index.d == r.dim:
                r.index = index
                return r
        if not rebuild:
            return r
        if docs is None:
            raise ValueError(f"{folder}: the dense index was built on backbone {meta.get('backbone_fingerprint')}, "
                             f"not on this one ({backbone.info.fingerprint}); pass the documents to rebuild it")
        log.warning("dense index in %s was built on backbone %s, not %s: re-embedding %d documents", folder,
                    meta.get("backbone_fingerprint"), backbone.info.fingerprint, len(docs))
        r._build_dense(docs, None)
        r.rebuilt = True
        return r


def _write(path: Path, writer) -> None:
    """Write through `writer(tmp_path)`, fsync, rename into place: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- documents inside a module artifact ----------------------------------------------------------

DOCUMENTS_FILE = "documents.jsonl"      # one {"id", "text", "title"?} a line, as POST .../documents takes
VECTORS_FILE = "documents.safetensors"  # optional: `vectors` (N, d), their dense vectors in the same order


def documents_files(docs: Sequence[Document], retriever: "Retriever | None" = None) -> dict[str, bytes]:
    """The files that carry `docs` in a module artifact (`TaskModule.to_artifact(files=...)`), with
    the dense vectors of `retriever` (built on exactly these documents) when it has them, so that
    installing the artifact embeds nothing."""
    lines = [json.dumps({"id": d.id, "text": d.text, **({"title": d.title} if d.title is not None else {})},
                        ensure_ascii=False) for d in docs]
    files = {DOCUMENTS_FILE: "".join(line + "\n" for line in lines).encode()}
    if retriever is not None and retriever.index is not None:
        if retriever.ids != [d.id for d in docs] or retriever.digests != [d.digest for d in docs]:
            raise ValueError("the retriever was not built on these documents")
        from safetensors.numpy import save

        files[VECTORS_FILE] = save({"vectors": np.ascontiguousarray(retriever.vectors(), dtype=np.float32)})
    return files


def read_vectors(data: bytes) -> np.ndarray:
    """`vectors` (N, d) from a VECTORS_FILE (safetensors: never pickle). Raises ValueError."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{VECTORS_FILE} is not a valid safetensors file: {e}") from e
    v = tensors.get("vectors")
    if set(tensors) != {"vectors"} or v.ndim != 2 or v.dtype.kind != "f":
        raise ValueError(f"{VECTORS_FILE} must hold one floating tensor `vectors` (N, d)")
    return v.astype(np.float32)
