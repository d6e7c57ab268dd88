from typing import Annotated

from fastapi import Depends, Request

from service.runtime import Runtime
from service.security import require_admin, require_infer, require_reader


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
AdminDep = Depends(require_admin)
ReaderDep = Depends(require_reader)
InferDep = Depends(require_infer)
