"""A task's documents (the passages retrieval searches): upload as JSON lines (stored at once,
indexed in the background: a job), follow the job, list, get, delete, search."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from service.api.deps import AdminDep, InferDep, ReaderDep, RuntimeDep, read_body
from service.errors import UnsupportedMediaType

router = APIRouter(prefix="/tasks/{name}/documents", tags=["documents"])

MEDIA_TYPES = ("application/x-ndjson", "application/jsonl")
READ = [ReaderDep, InferDep]  # reading a task's documents needs the scope that runs the task


class DocumentOut(BaseModel):
    id: str
    text: str
    title: str | None = None


class JobOut(BaseModel):
    id: str
    task: str
    status: Literal["queued", "running", "done", "failed", "superseded"] = Field(
        description="`superseded`: newer documents arrived first; their job (`superseded_by`) indexes these too.")
    generation: int = Field(description="The generation of the task's documents it indexes.")
    dense: bool = Field(description="Whether it computes dense vectors (else the BM25 index, built with the "
                                    "documents, was all: done at once).")
    count: int = Field(description="Documents of that generation.")
    added: int = Field(description="New ids (the upload that made the generation).")
    replaced: int = Field(description="Ids that existed and were replaced.")
    done: int = Field(description="Documents embedded so far (resumed ones included).")
    total: int = Field(description="Documents this job embeds (those without a known vector); known once it runs.")
    resumed: int = Field(description="Of `done`, vectors an interrupted job had saved (after a restart).")
    error: str | None = None
    superseded_by: str | None = None
    created_at: float = Field(description="Unix time.")
    finished_at: float | None = None


class DocumentsAdded(BaseModel):
    task: str
    added: int = Field(description="New ids.")
    replaced: int = Field(description="Ids that existed and were replaced.")
    count: int = Field(description="Documents of the task now.")
    job: JobOut = Field(description="The job indexing them: GET /tasks/{name}/documents/jobs/{id}.")


class JobList(BaseModel):
    task: str
    jobs: list[JobOut] = Field(description="Newest first (the last 20 finished ones are kept).")


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


async def _read_body(request: Request, limit: int) -> bytes:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise UnsupportedMediaType(f"send documents as JSON lines with content-type {' or '.join(MEDIA_TYPES)} "
                                   f"(got {media or 'none'!r})")
    return await read_body(request, limit, "body")


_JSONL_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string"}, "example": '{"id": "p1", "title": "Paris", "text": "Paris is ..."}\n'}
    for t in MEDIA_TYPES}}}


@router.post("", status_code=202, response_model=DocumentsAdded, dependencies=[AdminDep], openapi_extra=_JSONL_BODY,
             summary="Add or replace documents: JSON lines {id, text, title?}; all or nothing; stored and "
                     "searchable by BM25 at once, indexed in the background (a job)",
             responses={415: {"description": "Not a JSON-lines content type"}})
async def post_documents(name: str, request: Request, response: Response, rt: RuntimeDep) -> DocumentsAdded:
    documents = rt.documents
    body = await _read_body(request, rt.settings.max_upload_bytes)
    job = await run_in_threadpool(documents.add, name, body)
    response.headers["Location"] = f"/tasks/{name}/documents/jobs/{job.id}"
    return DocumentsAdded(task=name, added=job.added, replaced=job.replaced, count=job.count, job=JobOut(**job.out()))


@router.get("/jobs", response_model=JobList, dependencies=READ, summary="The task's indexing jobs, newest first")
def list_jobs(name: str, rt: RuntimeDep) -> JobList:
    return JobList(task=name, jobs=[JobOut(**j.out()) for j in rt.documents.jobs(name)])


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=READ,
            summary="One indexing job: status and progress")
def get_job(name: str, job_id: str, rt: RuntimeDep) -> JobOut:
    return JobOut(**rt.documents.job(name, job_id).out())


@router.get("", response_model=DocumentList, dependencies=READ, summary="Count and a page of documents")
def list_documents(name: str, rt: RuntimeDep, offset: Annotated[int, Query(ge=0)] = 0,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> DocumentList:
    count, docs = rt.documents.list(name, offset, limit)
    return DocumentList(task=name, count=count, offset=offset, limit=limit,
                        documents=[DocumentOut(id=d.id, text=d.text, title=d.title) for d in docs])


@router.delete("", status_code=204, dependencies=[AdminDep], summary="Delete every document of the task")
def delete_documents(name: str, rt: RuntimeDep) -> Response:
    rt.documents.clear(name)
    return Response(status_code=204)


@router.get("/search", response_model=SearchResult, dependencies=READ,
            summary="Search the task's documents (bm25, dense, or hybrid = reciprocal-rank fusion)")
async def search_documents(name: str, rt: RuntimeDep,
                     q: Annotated[str, Query(min_length=1, max_length=2000, description="The query.")],
                     k: Annotated[int, Query(ge=1, le=100, description="Results at most.")] = 10,
                     method: Literal["bm25", "dense", "hybrid"] = "hybrid") -> SearchResult:
    hits = await rt.search(name, q, k, method)
    return SearchResult(task=name, method=method,
                        results=[SearchHit(id=d.id, score=s, title=d.title) for d, s in hits])


@router.get("/{doc_id:path}", response_model=DocumentOut, dependencies=READ, summary="One document")
def get_document(name: str, doc_id: str, rt: RuntimeDep) -> DocumentOut:
    d = rt.documents.get(name, doc_id)
    return DocumentOut(id=d.id, text=d.text, title=d.title)

