"""Documents as they arrive and as they are kept: JSON lines `{"id", "text", "title"?}`.

`parse_jsonl` checks an upload (a POST body, or the `documents.jsonl` an artifact carries) and
refuses the whole of it at the first bad line; `from_artifact` also checks the dense vectors an
artifact may carry beside them. `to_jsonl`/`read_jsonl` are the on-disk form (one document a line,
in order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modules.core.retrieval import DOCUMENTS_FILE, VECTORS_FILE, Document, read_vectors
from service.errors import Invalid

# GET .../documents/search and .../documents/jobs are not documents; "." and ".." are no URL path segment
RESERVED_IDS = frozenset({"search", "jobs", ".", ".."})


class DocumentIn(BaseModel):
    """One line of an upload."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256, description="Unique within the task; re-posting an id replaces it.")
    text: str = Field(min_length=1, description="The passage text (not empty).")
    title: str | None = Field(None, max_length=1024, description="Optional title, searched with the text.")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("id must not hold control characters")
        if v in RESERVED_IDS or v.startswith("jobs/"):
            raise ValueError(f"id {v!r} is reserved (search, jobs, jobs/..., . and ..)")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is empty")
        return v


def parse_jsonl(body: bytes) -> list[Document]:
    """Every line a document; the first bad line (numbered from 1) refuses the whole body (422).
    Blank lines are skipped."""
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(body.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise Invalid(f"line {n}: not UTF-8", code="invalid_document") from None
        except ValueError as e:
            raise Invalid(f"line {n}: not JSON ({e})", code="invalid_document") from None
        if not isinstance(row, dict):
            raise Invalid(f"line {n}: expected an object {{\"id\", \"text\", \"title\"?}}", code="invalid_document")
        try:
            doc = DocumentIn.model_validate(row)
        except ValidationError as e:
            why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'line'}: {err['msg']}" for err in e.errors())
            raise Invalid(f"line {n}: {why}"[:2000], code="invalid_document") from None
        if doc.id in seen:
            raise Invalid(f"line {n}: id {doc.id!r} is also on line {seen[doc.id]}", code="duplicate_id")
        seen[doc.id] = n
        docs.append(Document(doc.id, doc.text, doc.title))
    if not docs:
        raise Invalid("no documents in the body: send one JSON object a line", code="invalid_request")
    return docs


def to_jsonl(docs) -> bytes:
    lines = [json.dumps({"id": d.id, "text": d.text, **({"title": d.title} if d.title is not None else {})},
                        ensure_ascii=False) for d in docs]
    return "".join(line + "\n" for line in lines).encode()


def read_jsonl(path: Path) -> tuple[Document, ...]:
    """A documents file as written by `to_jsonl` (trusted: it is ours)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            docs.append(Document(row["id"], row["text"], row.get("title")))
    return tuple(docs)


@dataclass(frozen=True)
class Carried:
    """The documents an artifact carries, and their dense vectors (N, H) when it has them."""

    docs: list[Document]
    vectors: np.ndarray | None = None


def from_artifact(files: dict[str, bytes], width: int) -> Carried | None:
    """The documents in an artifact's files (None without `documents.jsonl`), checked before anything
    is stored, so a bad documents file refuses the whole upload (422 `invalid_artifact`). `width`:
    the backbone's hidden size, which carried vectors must have."""
    if DOCUMENTS_FILE not in files:
        return None
    try:
        docs = parse_jsonl(files[DOCUMENTS_FILE])
    except Invalid as e:
        raise Invalid(f"{DOCUMENTS_FILE}: {e.message}", code="invalid_artifact") from None
    vectors = None
    if VECTORS_FILE in files:
        try:
            vectors = read_vectors(files[VECTORS_FILE])
        except ValueError as e:
            raise Invalid(str(e), code="invalid_artifact") from None
        want = (len(docs), width)
        if vectors.shape != want or not np.isfinite(vectors).all():
            raise Invalid(f"{VECTORS_FILE}: vectors must be finite, of shape {want}; got {vectors.shape}",
                          code="invalid_artifact")
    return Carried(docs, vectors)
