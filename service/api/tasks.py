from fastapi import APIRouter, Request, Response

from service.api.deps import AdminDep, ReaderDep, RuntimeDep, read_body
from service.errors import Invalid
from service.schemas import TaskList, TaskOut, Uploaded

router = APIRouter(prefix="/tasks", tags=["tasks"])


@router.get("", response_model=TaskList, summary="List tasks", dependencies=[ReaderDep])
def list_tasks(rt: RuntimeDep) -> TaskList:
    return TaskList(tasks=rt.list_tasks())


@router.get("/{name}", response_model=TaskOut, summary="One task: manifest, version, size",
            dependencies=[ReaderDep])
def get_task(name: str, rt: RuntimeDep) -> TaskOut:
    return rt.get_task(name)


async def _read_artifact(request: Request, limit: int) -> bytes:
    """The raw body, or the multipart field `file`; 413 past `limit` bytes (checked while reading)."""
    body = await read_body(request, limit, "artifact")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        request._body = bytes(body)  # let starlette parse what we already read
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Invalid("multipart upload needs a file field named 'file'", code="invalid_request")
        return await upload.read()
    if not body:
        raise Invalid("empty body: send the artifact (zip or tar.gz) as the body", code="invalid_request")
    return bytes(body)


@router.put("/{name}", status_code=201, response_model=Uploaded, dependencies=[AdminDep],
            summary="Upload or replace a task module (raw zip/tar.gz body, or multipart field `file`)",
            openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}, "required": True}})
async def put_task(name: str, request: Request, rt: RuntimeDep) -> Uploaded:
    data = await _read_artifact(request, rt.settings.max_upload_bytes)
    return await rt.put_task(name, data)


@router.delete("/{name}", status_code=204, dependencies=[AdminDep], summary="Delete a task")
async def delete_task(name: str, rt: RuntimeDep) -> Response:
    await rt.delete_task(name)
    return Response(status_code=204)
