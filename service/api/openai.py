"""OpenAI-compatible endpoints: `model` is a task name (`base` = the backbone alone), so existing
OpenAI clients work unchanged. Unset sampling parameters take the task's defaults (greedy unless
the task says otherwise); a classification task answers with its label as the text."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sse_starlette.sse import EventSourceResponse

from service.api.deps import ReaderDep, RuntimeDep
from service.errors import Invalid
from service.schemas import MAX_INPUTS, InferParameters, InferResponse, Inputs, Text
from service.security import require_infer

router = APIRouter(prefix="/v1", tags=["openai"])


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for

    model: str = Field(description="A task name; `base` is the backbone alone.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False

    def parameters(self) -> InferParameters:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return InferParameters(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                               stop=stop, seed=self.seed)


class CompletionRequest(_Request):
    prompt: Inputs = Field(description=f"One prompt, or a list of prompts (max {MAX_INPUTS}).")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    def parameters(self) -> InferParameters:
        p = super().parameters()
        if self.max_completion_tokens is not None:
            p.max_new_tokens = self.max_completion_tokens
        return p


def _usage(r: InferResponse) -> dict:
    u = r.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@router.get("/models", dependencies=[ReaderDep], summary="Tasks as OpenAI models")
def models(rt: RuntimeDep) -> dict:
    names = ["base"] + [t.name for t in rt.list_tasks() if t.status == "ready"]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "frozenlm"}
                                       for n in names]}


@router.post("/completions", summary="OpenAI-compatible text completion")
async def completions(req: CompletionRequest, rt: RuntimeDep, request: Request):
    require_infer(request, req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        if len(prompts) != 1:
            raise Invalid("streaming takes a single prompt", code="invalid_request")

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        return EventSourceResponse(_stream(await rt.stream(req.model, prompts[0], req.parameters()), chunk))
    r = await rt.infer(req.model, prompts, req.parameters(), disconnected=request.is_disconnected)
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": o.text, "finish_reason": _finish(o.finish_reason), "logprobs": None}
                        for i, o in enumerate(r.outputs)],
            "usage": _usage(r)}


@router.post("/chat/completions", summary="OpenAI-compatible chat completion")
async def chat_completions(req: ChatRequest, rt: RuntimeDep, request: Request):
    require_infer(request, req.model)
    messages = [m.model_dump() for m in req.messages]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        first = True

        def chunk(text: str, finish: str | None) -> dict:
            nonlocal first
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            first = False
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        return EventSourceResponse(_stream(await rt.stream(req.model, messages, req.parameters()), chunk))
    r = await rt.infer(req.model, [messages], req.parameters(), disconnected=request.is_disconnected)
    out = r.outputs[0]
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": _finish(out.finish_reason)}],
            "usage": _usage(r)}


async def _stream(events, chunk):
    import json

    async for event, value in events:
        if event == "text":
            yield {"data": json.dumps(chunk(value, None))}
        elif event == "done":
            out = value.outputs[0]
            tail = out.text if out.finish_reason == "label" else ""  # a label arrives whole, at the end
            yield {"data": json.dumps(chunk(tail, _finish(out.finish_reason)))}
        else:
            yield {"data": json.dumps({"error": value})}
    yield {"data": "[DONE]"}
