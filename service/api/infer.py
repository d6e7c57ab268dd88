from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from service.api.deps import InferDep, RuntimeDep
from service.schemas import InferRequest, InferResponse

router = APIRouter(tags=["inference"])


@router.post("/tasks/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
             dependencies=[InferDep],
             summary="Run a task on one or more inputs (`base` = the backbone alone)",
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or server-sent events when stream is true"}})
async def infer(name: str, req: InferRequest, rt: RuntimeDep, request: Request):
    if req.stream:
        return EventSourceResponse(await rt.infer_stream(name, req))
    return await rt.infer(name, req, disconnected=request.is_disconnected)
