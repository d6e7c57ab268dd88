"""A task's documents (the passages retrieval searches): upload as JSON lines, list, get, delete, search."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from modules.retrieval import Document
from service.api.deps import AdminDep, ReaderDep, RuntimeDep
from service.documents import DocumentStore
from service.errors import Invalid, ServiceError, TooLarge
from service.schemas import _Strict

router = APIRouter(prefix="/tasks/{name}/documents", tags=["documents"])

MEDIA_TYPES = ("application/x-ndjson", "application/jsonl")
RESERVED_IDS = frozenset({"search"})  # GET .../documents/search is the search, not a document


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class DocumentIn(_Strict):
    """One line of an upload."""

    id: str = Field(min_length=1, max_length=256, description="Unique within the task; re-posting an id replaces it.")
    text: str = Field(min_length=1, description="The passage text (not empty).")
    title: str | None = Field(None, max_length=1024, description="Optional title, searched with the text.")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("id must not hold control characters")
        if v in RESERVED_IDS:
            raise ValueError(f"id {v!r} is reserved")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is empty")
        return v


class DocumentOut(BaseModel):
    id: str
    text: str
    title: str | None = None


class DocumentsAdded(BaseModel):
    task: str
    added: int = Field(description="New ids.")
    replaced: int = Field(description="Ids that existed and were replaced.")
    count: int = Field(description="Documents of the task now.")


class DocumentList(BaseModel):
    task: str
    count: int = Field(description="Documents of the task in all.")
    offset: int
    limit: int
    documents: list[DocumentOut]


class SearchHit(BaseModel):
    id: str
    score: float = Field(description="BM25 score, cosine (dense), or reciprocal-rank-fusion sum (hybrid).")
    title: str | None = None


class SearchResult(BaseModel):
    task: str
    method: str
    results: list[SearchHit] = Field(description="Best first.")


def get_documents(rt: RuntimeDep) -> DocumentStore:
    rt._require_ready()
    return rt.documents


DocumentsDep = Annotated[DocumentStore, Depends(get_documents)]


def parse_jsonl(body: bytes) -> list[Document]:
    """Every line a document; the first bad line (numbered from 1) refuses the whole body. Blank lines
    are skipped."""
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


async def _read_body(request: Request, limit: int) -> bytes:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"send documents as JSON lines with content-type {' or '.join(MEDIA_TYPES)} "
                                   f"(got {media or 'none'!r})")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body is {declared} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"body is over the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


_JSONL_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string"}, "example": '{"id": "p1", "title": "Paris", "text": "Paris is ..."}\n'}
    for t in MEDIA_TYPES}}}


@router.post("", response_model=DocumentsAdded, dependencies=[AdminDep], openapi_extra=_JSONL_BODY,
             summary="Add or replace documents: JSON lines {id, text, title?}; all or nothing",
             responses={415: {"description": "Not a JSON-lines content type"}})
async def post_documents(name: str, request: Request, rt: RuntimeDep) -> DocumentsAdded:
    store = get_documents(rt)
    body = await _read_body(request, rt.settings.max_upload_bytes)
    docs = await run_in_threadpool(parse_jsonl, body)
    result = await run_in_threadpool(store.put, name, docs)
    return DocumentsAdded(task=name, added=result.added, replaced=result.replaced, count=result.count)


@router.get("", response_model=DocumentList, dependencies=[ReaderDep], summary="Count and a page of documents")
def list_documents(name: str, store: DocumentsDep, offset: Annotated[int, Query(ge=0)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DocumentList:
    count, docs = store.list(name, offset, limit)
    return DocumentList(task=name, count=count, offset=offset, limit=limit,
                        documents=[DocumentOut(id=d.id, text=d.text, title=d.title) for d in docs])


@router.delete("", status_code=204, dependencies=[AdminDep], summary="Delete every document of the task")
def delete_documents(name: str, store: DocumentsDep) -> Response:
    store.clear(name)
    return Response(status_code=204)


@router.get("/search", response_model=SearchResult, dependencies=[ReaderDep],
            summary="Search the task's documents (bm25, dense, or hybrid = reciprocal-rank fusion)")
def search_documents(name: str, store: DocumentsDep,
                     q: Annotated[str, Query(min_length=1, max_length=2000, description="The query.")],
                     k: Annotated[int, Query(ge=1, le=100, description="Results at most.")] = 10,
                     method: Literal["bm25", "dense", "hybrid"] = "hybrid") -> SearchResult:
    hits = store.search(name, q, k, method)
    return SearchResult(task=name, method=method,
                        results=[SearchHit(id=d.id, score=s, title=d.title) for d, s in hits])


@router.get("/{doc_id:path}", response_model=DocumentOut, dependencies=[ReaderDep], summary="One document")
def get_document(name: str, doc_id: str, store: DocumentsDep) -> DocumentOut:
    d = store.get(name, doc_id)
    return DocumentOut(id=d.id, text=d.text, title=d.title)

