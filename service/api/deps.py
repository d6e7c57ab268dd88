from typing import Annotated

from fastapi import Depends, Request

from service.errors import TooLarge
from service.runtime import Runtime
from service.security import require_admin, require_infer, require_reader


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AdminDep = Depends(require_admin)
ReaderDep = Depends(require_reader)
InferDep = Depends(require_infer)


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The raw body, read in chunks; 413 `<what>_too_large` past `limit` bytes, declared or read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"{what} is {declared} bytes; the limit is {limit}", code=f"{what}_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"{what} is over the limit of {limit} bytes", code=f"{what}_too_large")
    return bytes(body)
