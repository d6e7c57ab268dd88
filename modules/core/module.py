"""The module protocol: the manifest and the TaskModule base class every kind derives from.

A task module is immutable once loaded. It knows how to turn a request's text into token ids
(its `template`) and what it contributes to a backbone pass (`contribution`). The engine never
asks which kind it is.

The registry of kinds and the artifact loader are in `modules.registry`.
"""

from __future__ import annotations

import functools
import json
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from modules.core.artifact import ArtifactError, pack
from modules.core.backbone import Backbone
from modules.core.batch import Contribution

if TYPE_CHECKING:
    from modules.core.stages import Prepared, Probe

FORMAT = "frozenlm.module/1"
MANIFEST_FILE = "module.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_LABELS = 32        # labels of a classification task
MAX_LABEL_TOKENS = 16  # tokens of one label's verbalizer

class BackboneMismatch(ArtifactError):
    """The module was made for another backbone (HTTP 409)."""


class Strict(BaseModel):
    """A model that refuses unknown fields: manifests, configs and the HTTP schemas all are."""

    model_config = ConfigDict(extra="forbid")


class BackboneRef(Strict):
    """The backbone a module was trained on; loading onto another one is refused."""

    name: str = Field("", description="Human-readable backbone name.")
    model_type: str
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    fingerprint: str = Field(description="Hash of the backbone's config and a fixed weight sample.")

    @classmethod
    def of(cls, backbone: Backbone) -> "BackboneRef":
        i = backbone.info
        return cls(name=backbone.name, model_type=i.model_type, hidden_size=i.hidden_size,
                   num_layers=i.num_layers, vocab_size=i.vocab_size, fingerprint=i.fingerprint)


class GenerationDefaults(Strict):
    max_new_tokens: int = Field(64, ge=1, description="Default number of new tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 means no top-k filtering.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")


class LabelScoring(Strict):
    """How a classification task turns its labels' log-likelihoods into probabilities."""

    calibrate: bool = Field(False, description="Contextual calibration (Zhao et al. 2021): divide each label's "
                                               "probability by its probability on content-free inputs (\"N/A\", "
                                               "\"\", \"[MASK]\"), computed once per loaded module.")
    length_normalize: bool = Field(False, description="Score each verbalizer by its mean token log-likelihood "
                                                      "instead of the sum (multi-token verbalizers).")


class Manifest(Strict):
    """`module.json`: what a module is, what it was made for, how to call it."""

    format: Literal["frozenlm.module/1"] = FORMAT
    kind: str = Field(description="The module kind; a key of the kind registry.")
    backbone: BackboneRef
    config: dict[str, Any] = Field(default_factory=dict, description="The kind's own config.")
    template: str = Field("{input}", description="Input template; `{input}` is replaced by the request text.")
    chat: bool = Field(False, description="Wrap the rendered template in the tokenizer's chat template.")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)
    labels: dict[str, str] | None = Field(
        None, description="Classification: label -> verbalizer text scored as the continuation.")
    scoring: LabelScoring = Field(default_factory=LabelScoring)
    metrics: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("template")
    @classmethod
    def _has_input(cls, v: str) -> str:
        if "{input}" not in v:
            raise ValueError("template must contain {input}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) < 2 or any(not t for t in v.values())):
            raise ValueError("labels needs at least two labels, each with a non-empty verbalizer")
        if v is not None and len(v) > MAX_LABELS:
            raise ValueError(f"labels has {len(v)} labels; at most {MAX_LABELS} are allowed")
        return v


class TaskModule(nn.Module):
    """Base class of every kind. Subclasses set `kind` and `Config`, create their parameters in
    `__init__(manifest, config, backbone)`, and override `contribution`.

    Tensor keys in the artifact are `<kind>.<parameter name>` (e.g. `prompt.embeddings`)."""

    kind: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    vectors: ClassVar[tuple[str, ...]] = ()  # see param_groups
    # A kind that reads its task's documents (rrr): the server gives them with each request (its
    # modules.core.stages.Context), and answers 409 while the task has none.
    reads_documents: ClassVar[bool] = False

    def __init__(self, manifest: Manifest, config: BaseModel, backbone: Backbone):
        super().__init__()
        self.manifest = manifest
        self.config = config
        self.tokenizer = backbone.tokenizer
        for label, ids in zip(manifest.labels or {}, self.label_ids):
            if len(ids) > MAX_LABEL_TOKENS:
                raise ValueError(f"label {label!r}'s verbalizer is {len(ids)} tokens; "
                                 f"at most {MAX_LABEL_TOKENS} are allowed")

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def new(cls, backbone: Backbone, config: BaseModel | dict | None = None, **manifest_fields) -> "TaskModule":
        """A fresh, trainable module for `backbone` (parameters initialised by the kind)."""
        cfg = config if isinstance(config, BaseModel) else cls.Config(**(config or {}))
        manifest = Manifest(kind=cls.kind, backbone=BackboneRef.of(backbone),
                            config=cfg.model_dump(), **manifest_fields)
        module = cls(manifest, cfg, backbone)
        module.initialize(backbone)
        return module.to(backbone.device)

    def initialize(self, backbone: Backbone) -> None:
        """Initialise parameters of a new module (not called when loading an artifact)."""

    @classmethod
    def build(cls, manifest: Manifest, config: BaseModel, backbone: Backbone) -> "TaskModule":
        """`cls(manifest, config, backbone)`, any construction error an ArtifactError (422)."""
        try:
            return cls(manifest, config, backbone)
        except ArtifactError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ArtifactError(f"invalid {cls.kind} module: {e}") from e

    @classmethod
    def check(cls, manifest: Manifest, shapes: dict[str, tuple[int, ...]], backbone: Backbone) -> BaseModel:
        """Check a manifest and its tensors' names and shapes (e.g. from a safetensors header)
        against the kind's config and the backbone, allocating nothing: the module is built on
        the meta device. Returns the validated config; raises ArtifactError."""
        if manifest.backbone.fingerprint != backbone.info.fingerprint:
            raise BackboneMismatch(
                f"module was made for backbone {manifest.backbone.name or manifest.backbone.model_type} "
                f"(fingerprint {manifest.backbone.fingerprint}), this server runs {backbone.name} "
                f"(fingerprint {backbone.info.fingerprint})")
        try:
            cfg = cls.Config(**manifest.config)
        except ValidationError as e:
            raise ArtifactError(f"invalid {cls.kind} config: {e}") from e
        with torch.device("meta"):
            expected = cls.build(manifest, cfg, backbone).tensors(device="meta")
        if set(shapes) != set(expected):
            raise ArtifactError(
                f"weights do not match the {cls.kind} config: expected tensors {sorted(expected)}, "
                f"got {sorted(shapes)}")
        for key, want in expected.items():
            if tuple(shapes[key]) != tuple(want.shape):
                raise ArtifactError(f"tensor {key} has shape {tuple(shapes[key])}, expected {tuple(want.shape)}")
        return cfg

    @classmethod
    def from_tensors(cls, manifest: Manifest, tensors: dict[str, torch.Tensor], backbone: Backbone) -> "TaskModule":
        """Build a loaded module, checking every tensor against the kind's config and the backbone."""
        cfg = cls.check(manifest, {k: tuple(t.shape) for k, t in tensors.items()}, backbone)
        for key, got in tensors.items():
            if not got.is_floating_point():
                raise ArtifactError(f"tensor {key} has dtype {got.dtype}, expected a floating dtype")
            if not torch.isfinite(got).all():
                raise ArtifactError(f"tensor {key} contains NaN or Inf")
        module = cls.build(manifest, cfg, backbone)
        module.load_tensors(tensors)
        module.requires_grad_(False)
        return module.to(device=backbone.device, dtype=backbone.dtype).eval()

    # --- what the engine asks ----------------------------------------------------------------

    def encode(self, text: str | list[dict]) -> list[int]:
        """Token ids of the rendered template for one request: a text, or chat messages
        ([{"role", "content"}], the last one the user's). The template renders the last user
        message; a chat task keeps the earlier turns, any other task reads the last message only."""
        if isinstance(text, str):
            return encode_template(self.tokenizer, self.manifest.template, self.manifest.chat, text)
        if not text or text[-1].get("role") != "user":
            raise ValueError("the last chat message must be the user's")
        last = self.manifest.template.replace("{input}", text[-1]["content"])
        if not self.manifest.chat:
            return self.tokenizer(last)["input_ids"]
        messages = [*text[:-1], {"role": "user", "content": last}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def contribution(self, ids: list[int]) -> Contribution:
        """What this module adds to a backbone pass for a row with these token ids."""
        if self.probes:
            raise TypeError(f"a {self.kind} row needs a probe first: use modules.core.stages.prepare")
        return Contribution()

    @classmethod
    def retrieval_of(cls, config: dict) -> str | None:
        """How a module of this kind with this config searches its task's documents (`bm25`,
        `dense` or `hybrid`); None for a kind that reads none (see `reads_documents`)."""
        return None

    def probe(self, ids: list[int], context=None) -> "Probe | None":
        """A backbone pass this module needs over the input before its row runs, or None (the
        usual case). `context`: what the request brings besides its ids (modules.core.stages.Context,
        e.g. the task's documents). A module that probes turns the result into its row in `finish`;
        see modules.core.stages, which runs the probes of a whole batch together."""
        return None

    def finish(self, ids: list[int], results: list, state=None) -> "tuple[list[int], Contribution] | Prepared":
        """The final row from the probe's results, one per probe row: hidden states (len(row), H),
        or the sampled texts; `state` is the probe's own (`Probe.state`), handed back. Returns
        (ids, contribution), or a Prepared to add `info`. Never changes the module: one loaded
        module serves every request."""
        raise NotImplementedError(f"kind {self.kind} does not probe")

    @property
    def probes(self) -> bool:
        return type(self).probe is not TaskModule.probe

    @property
    def num_virtual_tokens(self) -> int:
        """Positions this module adds in front of every row (counted against the input limit)."""
        return 0

    def pass_length(self, n: int) -> int:
        """The longest backbone pass a request of `n` rendered tokens leads to (for the input limit)."""
        return n + self.num_virtual_tokens

    def probe_tokens(self, n: int) -> int:
        """Tokens this module's probes put through the backbone for a request of `n` rendered
        tokens, before its final row (0 for kinds that do not probe). The scheduler charges them."""
        return 0

    @functools.cached_property
    def label_ids(self) -> list[list[int]]:
        """Token ids of each label's verbalizer, in the manifest's label order."""
        return [self.tokenizer(v, add_special_tokens=False)["input_ids"]
                for v in (self.manifest.labels or {}).values()]

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups. A kind with network weights besides vectors in the
        embedding space (ID-PT, a connector) names the vectors in `vectors`: they take `lr`, the
        network `lr * config.network_lr_scale` (Adam moves every weight by about the learning rate
        per step; a soft prompt's rate would wreck a dense layer)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not self.vectors:
            return [{"params": [p for _, p in named], "lr": lr}]
        return [{"params": [p for n, p in named if n in self.vectors], "lr": lr},
                {"params": [p for n, p in named if n not in self.vectors], "lr": lr * self.config.network_lr_scale}]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    # --- serialisation -----------------------------------------------------------------------

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor of the artifact, keyed `<kind>.<parameter name>` (on `device`; "meta"
        for shapes alone)."""
        return {f"{self.kind}.{k}": v.detach().to(device, torch.float32).contiguous()
                for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `tensors()` (shapes already checked)."""
        self.load_state_dict({k.removeprefix(f"{self.kind}."): v for k, v in tensors.items()})

    def artifact_config(self) -> dict:
        """The config stored in the artifact (a kind may fold training-only parts away)."""
        return self.config.model_dump()

    def to_artifact(self, files: dict[str, bytes] | None = None, **manifest_updates) -> bytes:
        """The zip bytes; `files`: more files to carry (e.g. a task's documents, see
        modules.core.retrieval.documents_files)."""
        from safetensors.torch import save

        manifest = self.manifest.model_copy(update={"config": self.artifact_config(), **manifest_updates})
        return pack({**(files or {}), MANIFEST_FILE: manifest.model_dump_json(indent=2).encode(),
                     WEIGHTS_FILE: save(self.tensors())})


def encode_template(tokenizer, template: str, chat: bool, text: str) -> list[int]:
    prompt = template.replace("{input}", text)
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                               tokenize=False, add_generation_prompt=True)
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is not a finite number")
    return x


def _refuse(constant: str):
    raise ValueError(f"{constant} is not valid JSON (numbers must be finite)")


def loads(raw: bytes | str) -> Any:
    """JSON from an artifact: NaN, Infinity and numbers that overflow a float are refused
    (ValueError), where `json.loads` would accept them."""
    return json.loads(raw, parse_float=_finite, parse_constant=_refuse)


def parse_manifest(raw: bytes) -> Manifest:
    try:
        return Manifest.model_validate(loads(raw))
    except (ValueError, ValidationError) as e:
        raise ArtifactError(f"invalid {MANIFEST_FILE}: {e}") from e


def weight_shapes(data: bytes) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header, without reading the tensors."""
    try:
        if len(data) < 8 or (n := int.from_bytes(data[:8], "little")) > len(data) - 8:
            raise ValueError("the file is shorter than its header")
        header = loads(data[8:8 + n])
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if not all(isinstance(d, int) and d >= 0 for s in shapes.values() for d in s):
            raise ValueError("a shape is not a list of sizes")
        return shapes
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ArtifactError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from e
