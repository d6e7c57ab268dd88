"""OpenAI-compatible endpoints: `model` is a task name (`base` = the backbone alone), so existing
OpenAI clients work unchanged. Unset sampling parameters take the task's defaults (greedy unless
the task says otherwise); a classification task answers with its label as the text.

`n` samples per prompt share one prefill (choice i of prompt p is at index p * n + i, seeded
seed + i); `logprobs` (completions: an int k) and `logprobs` / `top_logprobs` (chat) answer in
OpenAI's shapes, streamed too: the model's log-softmax before temperature, top-k and top-p.
`response_format` {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
"strict"}} is structured output (`parameters.json_schema`; json_object is the schema {"type": "object"});
the output always matches, strict or not, or finishes with "length"."""

from __future__ import annotations

import codecs
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from sse_starlette.sse import EventSourceResponse

from modules.core.constraint import ANY_OBJECT
from service.api.deps import ReaderDep, RuntimeDep
from service.errors import Invalid
from service.schemas import (
    MAX_INPUTS,
    MAX_LOGPROBS,
    MAX_SAMPLES,
    InferParameters,
    InferResponse,
    Inputs,
    Text,
    TokenLogprob,
)
from service.security import caller, require_infer

router = APIRouter(prefix="/v1", tags=["openai"])


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema (none: any JSON object).")
    strict: bool | None = Field(None, description="Accepted; the output always matches the schema.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type 'json_schema'")
        return self

    def schema(self) -> dict | None:
        """The JSON schema the output must match, or None (free text)."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return dict(ANY_OBJECT)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we have no use for

    model: str = Field(description="A task name; `base` is the backbone alone.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt = Field(1, ge=1, le=MAX_SAMPLES, description="Samples per prompt, sharing one prefill; sample i is "
                                                              "seeded seed + i.")
    stream: StrictBool = False
    response_format: ResponseFormat | None = Field(
        None, description="{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name', 'schema'}}: "
                          "structured output ('text': free text, the default).")

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, v, info):
        """OpenAI's API takes null for these and means the default."""
        return cls.model_fields[info.field_name].default if v is None else v

    def parameters(self) -> InferParameters:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        schema = self.response_format.schema() if self.response_format is not None else None
        return InferParameters(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                               stop=stop, seed=self.seed, n=self.n, logprobs=self.top_k_logprobs(),
                               json_schema=schema)

    def top_k_logprobs(self) -> int | None:
        return None


class CompletionRequest(_Request):
    prompt: Inputs = Field(description=f"One prompt, or a list of prompts (max {MAX_INPUTS}).")
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                       description="Each token's logprob and the k most likely alternatives.")

    def top_k_logprobs(self) -> int | None:
        return self.logprobs


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = Field(None, description="Return each token's logprob.")
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="With logprobs: the k most likely alternatives of each token.")

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return v

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    def top_k_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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


def _text_offsets(before: bytes, tokens: list[TokenLogprob], final: bool) -> list[int]:
    """Where each token starts in the text: the index of the character its first byte belongs to.
    `before`: the bytes of the text before these tokens; `final`: these tokens end the text (else a
    character they leave incomplete is not in the text yet)."""
    data = before + b"".join(bytes(t.bytes) for t in tokens)
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=final)
    out, at = [], len(before)
    for t in tokens:
        head = data[:at].decode("utf-8", "replace")
        out.append(len(head) - (0 if text.startswith(head) else 1))  # else: it starts inside a character
        at += len(t.bytes)
    return out


def _completion_logprobs(tokens: list[TokenLogprob] | None, before: bytes = b"", final: bool = True) -> dict | None:
    """The completions API's logprobs: the top_logprobs of a token hold its k alternatives and the
    token itself (up to k + 1 entries, keyed by text, as OpenAI's); text_offset as `_text_offsets`."""
    if tokens is None:
        return None
    top = []
    for t in tokens:
        alternatives = {}
        for a in t.top_logprobs:
            alternatives.setdefault(a.token, a.logprob)
        alternatives.setdefault(t.token, t.logprob)
        top.append(alternatives)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": top, "text_offset": _text_offsets(before, tokens, final)}


def _chat_logprobs(tokens: list[TokenLogprob] | None) -> dict | None:
    """The chat API's logprobs: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    if tokens is None:
        return None

    def one(t) -> dict:
        return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}

    return {"content": [{**one(t), "top_logprobs": [one(a) for a in t.top_logprobs]} for t in tokens],
            "refusal": None}


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

        sent: dict[int, bytes] = {}  # choice -> the bytes of its tokens so far (text_offset)

        def chunk(index: int, text: str, tokens: list[TokenLogprob] | None, finish: str | None) -> dict:
            logprobs = _completion_logprobs(tokens, sent.get(index, b""), final=finish is not None)
            if logprobs is not None:
                sent[index] = sent.get(index, b"") + b"".join(bytes(t.bytes) for t in tokens)
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

        events = await rt.stream(req.model, prompts[0], req.parameters(), caller=caller(request))
        return EventSourceResponse(_stream(events, chunk))
    r = await rt.infer(req.model, prompts, req.parameters(), disconnected=request.is_disconnected,
                       caller=caller(request))
    # outputs come input by input, n per input: choice p * n + i is sample i of prompt p
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": o.text, "finish_reason": _finish(o.finish_reason),
                         "logprobs": _completion_logprobs(o.logprobs)} for i, o in enumerate(r.outputs)],
            "usage": _usage(r)}


@router.post("/chat/completions", summary="OpenAI-compatible chat completion")
async def chat_completions(req: ChatRequest, rt: RuntimeDep, request: Request):
    require_infer(request, req.model)
    messages = [m.model_dump() for m in req.messages]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if req.stream:
        started: set[int] = set()  # choices whose first chunk (with the role) went out

        def chunk(index: int, text: str, tokens: list[TokenLogprob] | None, finish: str | None) -> dict:
            delta = {"content": text} if text or index not in started else {}
            if index not in started:
                started.add(index)
                delta = {"role": "assistant", **delta}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish,
                                 "logprobs": _chat_logprobs(tokens)}]}

        events = await rt.stream(req.model, messages, req.parameters(), caller=caller(request))
        return EventSourceResponse(_stream(events, chunk))
    r = await rt.infer(req.model, [messages], req.parameters(), disconnected=request.is_disconnected,
                       caller=caller(request))
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": o.text},
                         "finish_reason": _finish(o.finish_reason), "logprobs": _chat_logprobs(o.logprobs)}
                        for i, o in enumerate(r.outputs)],
            "usage": _usage(r)}


async def _stream(events, chunk):
    """One chunk per streamed piece (of any choice), then one closing chunk per choice with its
    finish_reason, then [DONE]."""
    import json

    async for event, value in events:
        if event == "text":
            yield {"data": json.dumps(chunk(value.index, value.text, value.logprobs, None))}
        elif event == "done":
            for i, out in enumerate(value.outputs):
                tail = out.text if out.finish_reason == "label" else ""  # a label arrives whole, at the end
                yield {"data": json.dumps(chunk(i, tail, None, _finish(out.finish_reason)))}
        else:
            yield {"data": json.dumps({"error": value})}
    yield {"data": "[DONE]"}
