import json

from fastapi import APIRouter, Request
from sse_starlette.sse import EventSourceResponse

from service.api.deps import InferDep, RuntimeDep
from service.errors import Invalid
from service.schemas import InferRequest, InferResponse
from service.security import caller

router = APIRouter(tags=["inference"])


@router.post("/tasks/{name}/infer", response_model=InferResponse, response_model_exclude_none=True,
             dependencies=[InferDep],
             summary="Run a task on one or more inputs (`base` = the backbone alone)",
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or server-sent events when stream is true"}})
async def infer(name: str, req: InferRequest, rt: RuntimeDep, request: Request):
    if req.stream:
        if not isinstance(req.inputs, str):
            raise Invalid("streaming takes a single input text", code="invalid_request")
        events = await rt.stream(name, req.inputs, req.parameters, caller=caller(request))
        return EventSourceResponse(_sse(events, samples=(req.parameters.n or 1) > 1))
    inputs = [req.inputs] if isinstance(req.inputs, str) else req.inputs
    return await rt.infer(name, inputs, req.parameters, disconnected=request.is_disconnected,
                          caller=caller(request))


async def _sse(events, samples: bool):
    """{"text": piece} per piece (with "index", the sample's, when n > 1, and "logprobs", its
    tokens', when asked), then an event `done` with the whole response (or `error`)."""
    async for event, value in events:
        if event == "text":
            data = {"text": value.text}
            if samples:
                data["index"] = value.index
            if value.logprobs is not None:
                data["logprobs"] = [t.model_dump() for t in value.logprobs]
            yield {"data": json.dumps(data)}
        elif event == "done":
            yield {"event": "done", "data": value.model_dump_json(exclude_none=True)}
        else:
            yield {"event": "error", "data": json.dumps({"error": value})}
