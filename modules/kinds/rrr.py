"""Kind `rrr`: retrieve, rerank, read - open-book question answering over a task's documents.

One request goes through four steps, two of them backbone passes that batch with other tasks' rows:

1. retrieve: the `candidates` best documents for the question (BM25, dense or hybrid; see
   modules/core/retrieval.py), from the documents the request brings (its `Context`);
2. rerank (a probe, modules.core.stages): one row per candidate, `rerank_template` rendered with the
   passage (cut to `rerank_passage_tokens`) and then the question, read at layer `reranker_depth` of
   the frozen backbone; the states of the positions after the passage (the question, which has
   read the passage: a causal model's joint encoding) are averaged, and a small head scores them:

       score = w . LayerNorm(h) + b + prior_weight * -log(1 + retrieval rank)

   The retrieval-rank prior is a learned scalar: a new module (w = 0, prior_weight = 1) ranks
   exactly as the retriever does, and training decides how far the joint encoding moves that;
3. pack: best first, a passage is taken whole when it fits in what is left of `context_tokens`
   (the separators count); one that does not fit is skipped, except that the best passage, when
   alone longer than the budget, is cut to it (so the context is never empty when there are hits);
4. read: `reader_template` rendered with the packed context and the question, behind the reader's
   soft prompt (`reader_prompt_tokens` learned vectors), joins the batch like any other row.

The answer's `info` lists every candidate in reranked order: id, title, score, retrieval score and
whether it was packed. With `rerank: false` the module skips step 2 (retrieve-read). The request's
text is the question: keep the manifest's `template` at `{input}` (the question is read back from
its token ids).

The documents are the request's, not the module's (one loaded module serves every request and is
never changed): `Context.documents`, anything with `search(query, k, method) -> [(Document, score),
...]` and `len()`. The server gives the task's documents (service/documents/), training code a
`Corpus`. The candidates retrieved by the probe travel with the row to `finish` (the probe's state).

Example::

    m = RRRModule.new(backbone, {"candidates": 8, "context_tokens": 256})
    corpus = Corpus(Retriever(backbone).build(docs), docs)
    row = prepare(backbone, [(m, m.encode("Who wrote Hamlet?"), Context(corpus))])[0]   # Prepared(ids, contribution, info)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from modules.core.artifact import ArtifactError
from modules.core.batch import Contribution, Row
from modules.core.module import TaskModule
from modules.core.retrieval import Document, Retriever
from modules.core.stages import NO_CONTEXT, Context, Prepared, Probe

_SLOT = re.compile(r"(\{context\}|\{input\}|\{passage\})")


class RRRConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retrieval: Literal["bm25", "dense", "hybrid"] = Field("bm25", description="How candidates are retrieved.")
    candidates: int = Field(8, ge=1, le=64, description="Documents retrieved per question (and reranked).")
    rerank: bool = Field(True, description="Rerank the candidates (false: pack them in retrieval order).")
    reranker_depth: int = Field(0, ge=0, le=256, description="Layers of the backbone in the joint encoding; "
                                                     "0 = a third of the backbone's layers.")
    pool: Literal["question", "last", "mean"] = Field(
        "question", description="Reranker: the mean state over the positions after the passage (the question, "
                                "which reads the passage before it), the last position's state, or the row's mean.")
    rerank_template: str = Field("Passage: {passage}\nQuestion: {input}\nRelevant:",
                                 description="A reranker row: {passage} and {input} (the question).")
    rerank_passage_tokens: int = Field(160, ge=8, le=4096, description="A passage is cut to this many tokens "
                                                                       "in a reranker row.")
    context_tokens: int = Field(256, ge=8, le=8192, description="Token budget of the reader's context.")
    separator: str = Field("\n\n", description="Between packed passages (counts against the budget).")
    reader_template: str = Field("Context: {context}\nQuestion: {input}\nAnswer:",
                                 description="The reader's row: {context} and {input} (the question).")
    reader_prompt_tokens: int = Field(16, ge=0, le=512, description="The reader's soft prompt (0 = none).")
    init_text: str | None = Field(None, description="Text whose token embeddings initialise the reader "
                                                    "prompt (default: sampled vocabulary).")
    seed: int = 0

    @field_validator("reader_template", "rerank_template")
    @classmethod
    def _slots(cls, v: str, info) -> str:
        """Each template has its own slot and {input} once each, and not the other's slot."""
        own, other = ("{context}", "{passage}") if info.field_name == "reader_template" else ("{passage}", "{context}")
        if v.count(own) != 1 or v.count("{input}") != 1 or other in v:
            raise ValueError(f"{info.field_name} needs {own} and {{input}} once each")
        return v


class Documents(Protocol):
    def search(self, query: str, k: int, method: str) -> list[tuple[Document, float]]: ...

    def __len__(self) -> int: ...


class Corpus:
    """A Retriever and its documents as a request's documents (`Context(corpus)`: training,
    benchmarks, tests)."""

    def __init__(self, retriever: Retriever, docs: Sequence[Document]):
        self.retriever, self.by_id = retriever, {d.id: d for d in docs}

    def search(self, query: str, k: int, method: str) -> list[tuple[Document, float]]:
        return [(self.by_id[i], s) for i, s in self.retriever.search(query, k, method)]

    def __len__(self) -> int:
        return len(self.retriever)


@dataclass(frozen=True)
class Candidate:
    doc: Document
    retrieval_score: float
    rank: int  # 0 = the retriever's best


def pack(lengths: Sequence[int], budget: int, separator: int = 0) -> list[int]:
    """Greedy packing, in the given order (best first): how many tokens of each passage go into a
    context of `budget` tokens, `separator` tokens between two passages. A passage is taken whole
    when it fits in what is left, else skipped (0); only the first passage, when alone longer than
    the budget, is cut to it.

        pack([5, 9, 3], budget=10, separator=1)   # [5, 0, 3]
    """
    taken, used = [], 0
    for i, n in enumerate(lengths):
        cost = n + (separator if used else 0)
        if i == 0 and n > budget:
            taken.append(budget)
            used = budget
        elif used + cost <= budget and n > 0:
            taken.append(n)
            used += cost
        else:
            taken.append(0)
    return taken


class RRRModule(TaskModule):
    kind = "rrr"
    Config = RRRConfig
    reads_documents = True  # the server gives the task's documents with each request (Context.documents)

    def __init__(self, manifest, config: RRRConfig, backbone):
        super().__init__(manifest, config, backbone)
        if manifest.chat:
            raise ArtifactError("an rrr module reads the question from its ids: chat must be false")
        n = backbone.info.num_layers
        self.depth = config.reranker_depth or max(1, n // 3)
        if self.depth > n:
            raise ArtifactError(f"reranker_depth {self.depth} is more than the backbone's {n} layers")
        H = backbone.hidden_size
        self.reader_prompt = nn.Parameter(torch.zeros(config.reader_prompt_tokens, H))  # (P, H)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, 1)
        self.prior_weight = nn.Parameter(torch.ones(1))
        tok = self.tokenizer
        self._literal = {s: tok(s, add_special_tokens=False)["input_ids"] if s else []
                         for t in (config.reader_template, config.rerank_template, config.separator)
                         for s in _SLOT.split(t) if not _SLOT.fullmatch(s)}

    @torch.no_grad()
    def initialize(self, backbone) -> None:
        """Reader prompt from `init_text` (repeated to P tokens) or sampled vocabulary; the head
        starts at w = 0, prior_weight = 1: the retriever's order."""
        P = self.config.reader_prompt_tokens
        ids = self.tokenizer(self.config.init_text, add_special_tokens=False)["input_ids"] if self.config.init_text else []
        if ids:
            ids = (ids * (P // len(ids) + 1))[:P]
        else:
            g = torch.Generator().manual_seed(self.config.seed)
            ids = torch.randint(min(backbone.info.vocab_size, 5000), (P,), generator=g).tolist()
        table = backbone.model.get_input_embeddings().weight
        if P:
            self.reader_prompt.copy_(table[torch.tensor(ids, device=table.device)].float())
        self.head.weight.zero_()
        self.head.bias.zero_()
        self.prior_weight.fill_(1.0)

    # --- lengths -----------------------------------------------------------------------------

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.reader_prompt_tokens

    def _overhead(self, template: str) -> int:
        return sum(len(self._literal[s]) for s in _SLOT.split(template) if not _SLOT.fullmatch(s))

    def pass_length(self, n: int) -> int:
        c = self.config
        reader = c.reader_prompt_tokens + self._overhead(c.reader_template) + c.context_tokens + n
        reranker = self._overhead(c.rerank_template) + c.rerank_passage_tokens + n if c.rerank else 0
        return max(reader, reranker)

    def probe_tokens(self, n: int) -> int:
        """Every reranker row: `candidates` of [template | passage cut | question]. (The reader
        row is the request's own row, counted by `pass_length`.)"""
        c = self.config
        return c.candidates * (self._overhead(c.rerank_template) + c.rerank_passage_tokens + n) if c.rerank else 0

    # --- the steps ---------------------------------------------------------------------------

    def question(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @classmethod
    def retrieval_of(cls, config: dict) -> str:
        return cls.Config(**config).retrieval

    def retrieve(self, question: str, documents: Documents | None) -> list[Candidate]:
        """The retriever's best candidates for the question ([] without documents or hits)."""
        if documents is None or not question:
            return []
        hits = documents.search(question, self.config.candidates, self.config.retrieval)
        return [Candidate(d, float(s), r) for r, (d, s) in enumerate(hits)]

    def _render(self, template: str, slots: dict[str, list[int]]) -> list[int]:
        """Token ids of a template, each literal piece tokenized alone, slots given as ids (so a
        passage costs the same tokens wherever it lands)."""
        out: list[int] = []
        for s in _SLOT.split(template):
            out += slots[s[1:-1]] if _SLOT.fullmatch(s) else self._literal[s]
        return out

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def rerank_ids(self, question: str, doc: Document) -> list[int]:
        passage = self._tokens(doc.passage)[: self.config.rerank_passage_tokens]
        return self._render(self.config.rerank_template, {"passage": passage, "input": self._tokens(question)})

    def tail_length(self, question: str) -> int:
        """Positions after the passage in a reranker row (what pool "question" averages)."""
        after = self.config.rerank_template.split("{passage}", 1)[1]
        return len(self._render(after, {"input": self._tokens(question)}))

    def features(self, states: torch.Tensor, tail: int) -> torch.Tensor:
        """A reranker row's states at `depth` -> the pooled vector the head reads; `tail`: the
        positions after the passage. (T, H) -> (H,)"""
        pool = self.config.pool
        if pool == "question" and tail > 0:
            return states[-tail:].mean(0)
        return states.mean(0) if pool == "mean" else states[-1]

    def score(self, features: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """Rerank scores from pooled features (N, H) and retrieval ranks (N,). -> (N,)"""
        h = self.norm(features.to(self.head.weight.dtype))                                # (N, H)
        prior = -torch.log1p(ranks.to(h.dtype))                                          # (N,)
        return self.head(h).squeeze(-1) + self.prior_weight * prior

    def read(self, question: str, ordered: Sequence[Candidate]) -> tuple[list[int], list[bool]]:
        """The reader's token ids for candidates in final order, and which of them were packed."""
        c = self.config
        passages = [self._tokens(cand.doc.passage) for cand in ordered]
        sep = self._literal[c.separator] if c.separator else []
        taken = pack([len(p) for p in passages], c.context_tokens, len(sep))
        context: list[int] = []
        for p, n in zip(passages, taken):
            if n:
                context += (sep if context else []) + p[:n]
        ids = self._render(c.reader_template, {"context": context, "input": self._tokens(question)})
        return ids, [n > 0 for n in taken]

    # --- the probe protocol ------------------------------------------------------------------

    def probe(self, ids: list[int], context: Context = NO_CONTEXT) -> Probe:
        """Retrieve (from the request's documents), then one reranker row per candidate; the
        candidates are the probe's state, handed back to `finish` with the rows' states."""
        question = self.question(ids)
        cands = self.retrieve(question, context.documents)
        rows = [Row(self.rerank_ids(question, c.doc)) for c in cands] if self.config.rerank else []
        return Probe(rows, depth=self.depth, state=cands)

    def finish(self, ids: list[int], results: list, state: list[Candidate]) -> Prepared:
        """Rerank `state` (the probe's candidates) by the reranker rows' states, pack, read."""
        question, cands = self.question(ids), state
        if self.config.rerank and cands:
            tail = self.tail_length(question)
            feats = torch.stack([self.features(r, tail) for r in results])                # (N, H)
            scores = self.score(feats, torch.tensor([c.rank for c in cands], device=feats.device)).tolist()
        else:
            scores = [c.retrieval_score for c in cands]
        order = sorted(range(len(cands)), key=lambda i: (-scores[i], cands[i].rank))
        ordered = [cands[i] for i in order]
        reader_ids, used = self.read(question, ordered)
        passages = [{"id": cands[i].doc.id, "title": cands[i].doc.title, "score": _round(scores[i]),
                     "retrieval_score": _round(cands[i].retrieval_score), "used": u}
                    for i, u in zip(order, used)]
        prompt = self.reader_prompt if self.config.reader_prompt_tokens else None
        return Prepared(reader_ids, Contribution(prepend=prompt), {"passages": passages})


def _round(x: float) -> float:
    return round(float(x), 6) if math.isfinite(x) else 0.0
