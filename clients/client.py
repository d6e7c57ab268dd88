"""Python client for frozenlm: `Client` (sync) and `AsyncClient` over one base.

Example::

    from clients import Client

    with Client("http://127.0.0.1:8000") as c:
        print(c.infer("base", "What is the capital of France?").outputs[0].text)
        print(c.infer("sst2", "a gorgeous, witty film").outputs[0].label)

Every error the server answers raises a `FrozenLMError` subclass carrying the server's status,
code and message. 429 and 503 are retried (`retries` times, default 3), waiting what the server's
`Retry-After` says or else backing off exponentially. Pass `transport=httpx.ASGITransport(app)` to
talk to an app in-process.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class FrozenLMError(Exception):
    """An error answered by the server (or a transport failure, status 0)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class NotFound(FrozenLMError):
    pass


class Unauthorized(FrozenLMError):
    pass


class InvalidRequest(FrozenLMError):
    pass


class Conflict(FrozenLMError):
    pass


class Overloaded(FrozenLMError):
    pass


_BY_STATUS = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 400: InvalidRequest,
              413: InvalidRequest, 422: InvalidRequest, 429: Overloaded, 503: Overloaded}


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json()["error"]
        code, message = err["code"], err["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", resp.text[:500]
    raise _BY_STATUS.get(resp.status_code, FrozenLMError)(resp.status_code, code, message)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token (or one of its step's alternatives): its text, id, logprob and bytes."""

    token: str
    id: int
    logprob: float
    bytes: bytes
    top_logprobs: list["TokenLogprob"] = field(default_factory=list)  # the k most likely, best first

    @classmethod
    def of(cls, d: dict) -> "TokenLogprob":
        return cls(d["token"], d["id"], d["logprob"], bytes(d["bytes"]),
                   [cls.of(a) for a in d.get("top_logprobs", ())])


@dataclass(frozen=True)
class Output:
    text: str
    finish_reason: str
    label: str | None = None
    scores: dict[str, float] | None = None
    passages: list[dict] | None = None  # tasks that read documents (rrr): {id, title, score, retrieval_score, used}
    logprobs: list[TokenLogprob] | None = None  # with logprobs=k: one per generated token


@dataclass(frozen=True)
class InferResult:
    task: str
    version: int
    outputs: list[Output]
    usage: dict[str, int]
    timings_ms: dict[str, float]
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, d: dict) -> "InferResult":
        outs = [Output(o["text"], o["finish_reason"], o.get("label"), o.get("scores"), o.get("passages"),
                       None if o.get("logprobs") is None else [TokenLogprob.of(t) for t in o["logprobs"]])
                for o in d["outputs"]]
        return cls(d["task"], d["version"], outs, d["usage"], d["timings_ms"], d)

    def samples(self, n: int) -> list[list[Output]]:
        """The outputs of a request with n samples per input, grouped by input: [input][sample]."""
        return [self.outputs[i:i + n] for i in range(0, len(self.outputs), n)]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    version: int
    kind: str
    status: str
    size_bytes: int
    metrics: dict[str, Any]
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, d: dict) -> "TaskInfo":
        m = d.get("manifest") or {}
        return cls(d["name"], d["version"], d["kind"], d["status"], d["size_bytes"], m.get("metrics", {}), d)


@dataclass(frozen=True)
class Uploaded:
    name: str
    version: int
    kind: str
    sha256: str
    size_bytes: int


def _infer_body(inputs, params: dict) -> dict:
    return {"inputs": inputs, "parameters": params, "stream": False}


def _task_header(name: str) -> dict[str, str]:
    """Ray Serve routes a request carrying it to a replica that has the task's module loaded."""
    return {"serve_multiplexed_model_id": name}


def _artifact_bytes(artifact: bytes | str | Path) -> bytes:
    return artifact if isinstance(artifact, bytes) else Path(artifact).read_bytes()


def _with_progress(data: bytes, chunk: int = 1 << 16):
    """The bytes in chunks, with a progress bar on stderr (the upload is sent chunked)."""
    from tqdm.auto import tqdm

    with tqdm(total=len(data), unit="B", unit_scale=True, desc="upload") as bar:
        for i in range(0, len(data), chunk):
            yield data[i:i + chunk]
            bar.update(min(chunk, len(data) - i))


# --- documents ---------------------------------------------------------------------------------

JSONL_TYPE = "application/x-ndjson"


@dataclass(frozen=True)
class DocumentsJob:
    """An indexing job (POST /tasks/{name}/documents answers with one): `status` queued, running,
    done, failed or superseded (then `superseded_by` indexes these documents too); `done` of
    `total` documents embedded."""

    id: str
    task: str
    status: str
    done: int
    total: int
    count: int
    added: int
    replaced: int
    dense: bool
    error: str | None = None
    superseded_by: str | None = None
    raw: dict = field(repr=False, default_factory=dict)

    @classmethod
    def of(cls, d: dict) -> "DocumentsJob":
        return cls(d["id"], d["task"], d["status"], d["done"], d["total"], d["count"], d["added"], d["replaced"],
                   d["dense"], d.get("error"), d.get("superseded_by"), d)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "superseded")


def _documents_body(documents) -> bytes:
    """JSON lines from bytes (sent as they are), a .jsonl file's path, or dicts / objects with
    id, text and title."""
    if isinstance(documents, bytes):
        return documents
    if isinstance(documents, (str, Path)):
        return Path(documents).read_bytes()
    rows = []
    for d in documents:
        row = d if isinstance(d, dict) else {"id": d.id, "text": d.text, "title": getattr(d, "title", None)}
        rows.append(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False))
    return "".join(r + "\n" for r in rows).encode()


def _job_failed(job: DocumentsJob) -> None:
    if job.status == "failed":
        raise FrozenLMError(0, "documents_index_failed", f"indexing job {job.id} failed: {job.error}")


RETRY_STATUSES = (429, 503)


class _Base:
    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 0.5):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.retries, self.backoff = retries, backoff

    def _delay(self, resp: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying `resp` (429/503: the server's Retry-After, else exponential
        backoff), or None when it is final."""
        if resp.status_code not in RETRY_STATUSES or attempt >= self.retries:
            return None
        after = resp.headers.get("retry-after", "")
        return min(float(after), 60.0) if after.replace(".", "", 1).isdigit() else self.backoff * 2 ** attempt


class Client(_Base):
    """Synchronous client; use as a context manager or call `close()`."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 3, backoff: float = 0.5):
        super().__init__(url, api_key, timeout, retries, backoff)
        self._http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout,
                                  transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                raise FrozenLMError(0, "transport_error", str(e)) from e
            delay = self._delay(resp, attempt)
            if delay is None:
                break
            time.sleep(delay)
        _raise_for(resp)
        return resp

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def backbone(self) -> dict:
        return self._request("GET", "/backbone").json()

    def metrics(self) -> str:
        """The Prometheus metrics text."""
        return self._request("GET", "/metrics").text

    def list_tasks(self) -> list[TaskInfo]:
        return [TaskInfo.of(t) for t in self._request("GET", "/tasks").json()["tasks"]]

    def get_task(self, name: str) -> TaskInfo:
        return TaskInfo.of(self._request("GET", f"/tasks/{name}").json())

    def upload(self, name: str, artifact: bytes | str | Path, progress: bool = False) -> Uploaded:
        """Upload (or replace) a module: artifact bytes or a file path; `progress` shows a bar."""
        data = _artifact_bytes(artifact)
        r = self._request("PUT", f"/tasks/{name}", content=_with_progress(data) if progress else data,
                          headers={"Content-Type": "application/octet-stream"})
        return Uploaded(**r.json())

    def delete(self, name: str) -> None:
        self._request("DELETE", f"/tasks/{name}")

    def infer(self, name: str, inputs: str | list[str], **parameters) -> InferResult:
        """Run a task on a text or a list of texts. `parameters` are /infer's: max_new_tokens,
        temperature, top_p, top_k, seed, stop, choices, logprobs, n, and structured output with
        json_schema (a dict) or regex (a str): the text then parses (or finish_reason is "length")."""
        r = self._request("POST", f"/tasks/{name}/infer", json=_infer_body(inputs, parameters),
                          headers=_task_header(name))
        return InferResult.of(r.json())

    # --- documents -----------------------------------------------------------------------------

    def add_documents(self, name: str, documents, wait: bool = False, on_progress=None) -> DocumentsJob:
        """Add or replace a task's documents (JSON-lines bytes, a .jsonl path, or dicts {id, text,
        title?}): stored at once, indexed by a job. `wait`: follow the job until it ends."""
        r = self._request("POST", f"/tasks/{name}/documents", content=_documents_body(documents),
                          headers={"Content-Type": JSONL_TYPE})
        job = DocumentsJob.of(r.json()["job"])
        return self.wait_documents(name, job.id, on_progress=on_progress) if wait else job

    def documents_job(self, name: str, job_id: str) -> DocumentsJob:
        return DocumentsJob.of(self._request("GET", f"/tasks/{name}/documents/jobs/{job_id}").json())

    def wait_documents(self, name: str, job_id: str, poll: float = 0.5, timeout: float | None = None,
                       on_progress=None) -> DocumentsJob:
        """Poll the job until it ends (following `superseded_by`); `on_progress(job)` after each poll.
        Raises FrozenLMError if it failed, TimeoutError past `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.documents_job(name, job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished and job.superseded_by:
                job_id = job.superseded_by
                continue
            if job.finished:
                _job_failed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"indexing job {job_id} did not finish within {timeout}s")
            time.sleep(poll)

    def list_documents(self, name: str, offset: int = 0, limit: int = 100) -> dict:
        """{task, count, offset, limit, documents: [{id, text, title}]}"""
        return self._request("GET", f"/tasks/{name}/documents", params={"offset": offset, "limit": limit}).json()

    def get_document(self, name: str, doc_id: str) -> dict:
        return self._request("GET", f"/tasks/{name}/documents/{quote(doc_id, safe='')}").json()

    def search_documents(self, name: str, query: str, k: int = 10, method: str = "hybrid") -> list[dict]:
        """[{id, score, title}] best first."""
        r = self._request("GET", f"/tasks/{name}/documents/search", params={"q": query, "k": k, "method": method})
        return r.json()["results"]

    def delete_documents(self, name: str) -> None:
        self._request("DELETE", f"/tasks/{name}/documents")


class AsyncClient(_Base):
    """Asynchronous client with the same methods as `Client`, awaited."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None, retries: int = 3, backoff: float = 0.5):
        super().__init__(url, api_key, timeout, retries, backoff)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout,
                                       transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.request(method, path, **kw)
            except httpx.TransportError as e:
                raise FrozenLMError(0, "transport_error", str(e)) from e
            delay = self._delay(resp, attempt)
            if delay is None:
                break
            await asyncio.sleep(delay)
        _raise_for(resp)
        return resp

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def backbone(self) -> dict:
        return (await self._request("GET", "/backbone")).json()

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def list_tasks(self) -> list[TaskInfo]:
        return [TaskInfo.of(t) for t in (await self._request("GET", "/tasks")).json()["tasks"]]

    async def get_task(self, name: str) -> TaskInfo:
        return TaskInfo.of((await self._request("GET", f"/tasks/{name}")).json())

    async def upload(self, name: str, artifact: bytes | str | Path) -> Uploaded:
        r = await self._request("PUT", f"/tasks/{name}", content=_artifact_bytes(artifact),
                                headers={"Content-Type": "application/octet-stream"})
        return Uploaded(**r.json())

    async def delete(self, name: str) -> None:
        await self._request("DELETE", f"/tasks/{name}")

    async def infer(self, name: str, inputs: str | list[str], **parameters) -> InferResult:
        r = await self._request("POST", f"/tasks/{name}/infer", json=_infer_body(inputs, parameters),
                                headers=_task_header(name))
        return InferResult.of(r.json())

    # --- documents -----------------------------------------------------------------------------

    async def add_documents(self, name: str, documents, wait: bool = False, on_progress=None) -> DocumentsJob:
        r = await self._request("POST", f"/tasks/{name}/documents", content=_documents_body(documents),
                                headers={"Content-Type": JSONL_TYPE})
        job = DocumentsJob.of(r.json()["job"])
        return await self.wait_documents(name, job.id, on_progress=on_progress) if wait else job

    async def documents_job(self, name: str, job_id: str) -> DocumentsJob:
        return DocumentsJob.of((await self._request("GET", f"/tasks/{name}/documents/jobs/{job_id}")).json())

    async def wait_documents(self, name: str, job_id: str, poll: float = 0.5, timeout: float | None = None,
                             on_progress=None) -> DocumentsJob:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.documents_job(name, job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished and job.superseded_by:
                job_id = job.superseded_by
                continue
            if job.finished:
                _job_failed(job)
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"indexing job {job_id} did not finish within {timeout}s")
            await asyncio.sleep(poll)

    async def list_documents(self, name: str, offset: int = 0, limit: int = 100) -> dict:
        return (await self._request("GET", f"/tasks/{name}/documents",
                                    params={"offset": offset, "limit": limit})).json()

    async def get_document(self, name: str, doc_id: str) -> dict:
        return (await self._request("GET", f"/tasks/{name}/documents/{quote(doc_id, safe='')}")).json()

    async def search_documents(self, name: str, query: str, k: int = 10, method: str = "hybrid") -> list[dict]:
        r = await self._request("GET", f"/tasks/{name}/documents/search",
                                params={"q": query, "k": k, "method": method})
        return r.json()["results"]

    async def delete_documents(self, name: str) -> None:
        await self._request("DELETE", f"/tasks/{name}/documents")
