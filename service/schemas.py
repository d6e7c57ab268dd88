"""Request and response models: the public HTTP contract."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, StrictInt, field_validator, model_validator

from modules.core.module import MAX_LABELS, Strict

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"  # a task name matches it in full (re.fullmatch)


MAX_INPUTS = 64  # texts in one request, on every API
MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # most likely alternatives per generated token (parameters.logprobs, OpenAI top_logprobs)
MAX_SAMPLES = 16  # samples per input (parameters.n, OpenAI n)
MAX_REGEX_CHARS = 4096  # parameters.regex (a JSON schema's size is capped by modules.core.constraint)


def _utf8(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate, such as \\ud800)") from None
    return v


def _count(v: str | list[str]) -> str | list[str]:
    if isinstance(v, list) and not 1 <= len(v) <= MAX_INPUTS:
        raise ValueError(f"a list must hold 1 to {MAX_INPUTS} texts")
    return v


Text = Annotated[str, AfterValidator(_utf8)]  # any text a request carries: encodable as UTF-8
Inputs = Annotated[Text | list[Text], AfterValidator(_count)]  # one text, or 1 to MAX_INPUTS of them


class InferParameters(Strict):
    max_new_tokens: int | None = Field(None, ge=1, description="New tokens at most (default: the task's).")
    temperature: float | None = Field(None, ge=0.0, le=10.0, description="0 means greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=100000, description="0 means no top-k filtering.")
    stop: list[Text] | None = Field(None, max_length=16, description="Stop strings (not included in the text).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for sampling; same seed, same text.")
    choices: list[Text] | None = Field(
        None, min_length=2, max_length=MAX_LABELS,
        description="Answer choices (rank classification): each is scored as a continuation of the input, exactly "
                    "as given, as a task's labels are; the output's label is the most likely one and scores their "
                    "probabilities. Overrides a task's labels.")
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description=f"Return each generated token's log probability and its k (0 to {MAX_LOGPROBS}) most likely "
                    "alternatives: the log-softmax of the model's logits, before temperature, top-k and top-p. "
                    "Generation tasks only (a task that scores labels answers with `scores`).")
    n: StrictInt | None = Field(
        None, ge=1, le=MAX_SAMPLES,
        description=f"Samples per input (1 to {MAX_SAMPLES}), sharing one prefill of the input; sample i is seeded "
                    "seed + i. `outputs` then holds n outputs per input, input by input. Generation tasks only.")
    json_schema: dict[str, Any] | None = Field(
        None, description="Structured output: the text is JSON that validates against this JSON schema (or the "
                          "output finishes with 'length'). Generation tasks only; stop strings do not apply.")
    regex: str | None = Field(
        None, min_length=1, max_length=MAX_REGEX_CHARS,
        description="Structured output: the text matches this regular expression in full (Rust `regex` syntax; "
                    "or the output finishes with 'length'). Generation tasks only; stop strings do not apply.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is not None and any(not s or len(s) > 256 for s in v):
            raise ValueError("stop strings must be 1 to 256 characters")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v):
        if v is not None and (any(not c or len(c) > 256 for c in v) or len(set(v)) < len(v)):
            raise ValueError("choices must be distinct strings of 1 to 256 characters")
        return v

    @model_validator(mode="after")
    def _seeds_of_samples(self) -> "InferParameters":
        """Sample i is seeded seed + i: every one of them must be a valid seed."""
        if self.seed is not None and self.n is not None and self.seed + self.n - 1 > MAX_SEED:
            raise ValueError(f"seed + n - 1 must be at most {MAX_SEED} (sample i is seeded seed + i)")
        return self


class InferRequest(Strict):
    inputs: Inputs = Field(description=f"One text, or a list of texts (max {MAX_INPUTS}).")
    parameters: InferParameters = Field(default_factory=InferParameters)
    stream: bool = Field(False, description="Answer with server-sent events, one per new piece of text.")


class Passage(BaseModel):
    id: str
    title: str | None = None
    score: float = Field(description="The reranker's score (the retriever's when the task does not rerank).")
    retrieval_score: float = Field(description="BM25 score, cosine (dense), or reciprocal-rank-fusion sum (hybrid).")
    used: bool = Field(description="Packed into the reader's context.")


class TopLogprob(BaseModel):
    token: str = Field(description="The token's own text (U+FFFD when it holds part of a multi-byte character).")
    id: int = Field(description="The token id.")
    logprob: float
    bytes: list[int] = Field(description="The token's UTF-8 bytes (exact, also for part of a character).")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The step's most likely tokens, best first (k of them).")


class Output(BaseModel):
    text: str
    finish_reason: str = Field(description="'stop' (EOS or a stop string), 'length', or 'label'.")
    label: str | None = None
    scores: dict[str, float] | None = Field(None, description="Label probabilities (classification tasks).")
    passages: list[Passage] | None = Field(None, description="Tasks that read documents (rrr): the retrieved "
                                                             "passages, best first, and which were packed.")
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With parameters.logprobs: one entry per generated token (a stop string's tokens "
                          "included, the end-of-sequence token not).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class InferResponse(BaseModel):
    task: str
    version: int
    outputs: list[Output]
    usage: Usage
    timings_ms: dict[str, float]


class TaskOut(BaseModel):
    name: str
    version: int
    kind: str
    status: str = Field(description="'ready' or 'unavailable' (a corrupt artifact on disk).")
    size_bytes: int
    sha256: str
    manifest: dict[str, Any] | None = None
    error: str | None = None


class TaskList(BaseModel):
    tasks: list[TaskOut]


class Uploaded(BaseModel):
    name: str
    version: int
    kind: str
    sha256: str
    size_bytes: int


class BackboneOut(BaseModel):
    name: str
    model_type: str
    device: str
    dtype: str
    parameters: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str
