"""Typed configuration: one schema for the CLI flags and for recipe files.

Each command builds one of these models from its flags; a recipe holds the same models
under its keys. Validation of values lives here (pydantic); validation against a particular
checkpoint (trained length, architecture) lives in :mod:`ctxext.rope`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxext.data import DEFAULT_SHUFFLE_BUFFER
from ctxext.errors import CtxextError
from ctxext.rope.methods import ALL_METHODS, OPTION_DEFAULTS
from ctxext.text import plural

Method = Literal[ALL_METHODS]  # type: ignore[valid-type]  # the names defined in ctxext.rope
LinkMode = Literal["hardlink", "copy", "symlink"]
Task = Literal["ppl", "passkey", "context-use", "retrieval"]
RetrievalTemplate = Literal["auto", "code", "text"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DocSelection = Literal["same", "per-length"]


def known_encoding(v: str | None) -> str | None:
    """A codec name Python knows (validator shared by the eval and finetune configs)."""
    import codecs

    if v is not None:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (try latin-1 or cp1252)") from None
    return v


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable.

    Field docstrings document the fields in the source (and in recipe files); pydantic is not
    asked to extract them (``use_attribute_docstrings`` parses each class's source at import,
    which every `ctxext` start-up would pay). Schemas are built on first use (``defer_build``),
    so a command validates only the models it needs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ExtendConfig(StrictModel):
    """How to rewrite the rotary configuration."""

    method: Method
    """Scaling method: linear (position interpolation), ntk (NTK-aware base change), yarn,
    dynamic (dynamic NTK), llama3 (Llama-3.1-style) or longrope (per-pair factors)."""
    factor: float | None = None
    """Scale factor s = new context length / trained length (> 1)."""
    target_length: int | None = None
    """New context length in tokens; the factor is derived from it. Give factor or this."""
    beta_fast: float = OPTION_DEFAULTS["beta_fast"]
    """YaRN: pairs turning more than beta_fast times within the trained length are kept."""
    beta_slow: float = OPTION_DEFAULTS["beta_slow"]
    """YaRN: pairs turning fewer than beta_slow times are fully interpolated."""
    attention_factor: float | None = OPTION_DEFAULTS["attention_factor"]
    """YaRN and longrope: scale of cos/sin (softmax temperature); default 0.1 ln(s) + 1 (YaRN),
    sqrt(1 + ln s / ln L) (longrope; vLLM reads only this default)."""
    low_freq_factor: float = OPTION_DEFAULTS["low_freq_factor"]
    """llama3: wavelengths above trained_length / low_freq_factor are divided by s."""
    high_freq_factor: float = OPTION_DEFAULTS["high_freq_factor"]
    """llama3: wavelengths below trained_length / high_freq_factor are kept."""
    theta_multiplier: float | None = OPTION_DEFAULTS["theta_multiplier"]
    """ntk: rope_theta is multiplied by this; default s ** (d / (d - 2)) (bloc97's rule)."""
    long_factor: list[float] | None = OPTION_DEFAULTS["long_factor"]
    """longrope: rotary_dim/2 divisors of the pair frequencies, used past the trained length."""
    short_factor: list[float] | None = OPTION_DEFAULTS["short_factor"]
    """longrope: the divisors used up to the trained length; default all 1 (unchanged)."""

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 1):
            raise ValueError(f"factor must be a finite number > 1 (got {v})")
        return v

    @field_validator("target_length")
    @classmethod
    def _target(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"target_length must be a positive integer (got {v})")
        return v

    @field_validator("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    @field_validator("theta_multiplier")
    @classmethod
    def _positive_or_none(cls, v: float | None) -> float | None:
        return None if v is None else cls._positive(v)

    @field_validator("long_factor", "short_factor")
    @classmethod
    def _factors(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not math.isfinite(x) or x <= 0 for x in v)):
            raise ValueError("must be a non-empty list of finite numbers > 0")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> ExtendConfig:
        if (self.factor is None) == (self.target_length is None):
            raise ValueError("give exactly one of factor and target_length")
        if self.beta_fast <= self.beta_slow:
            raise ValueError("beta_fast must be greater than beta_slow")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        if self.method == "longrope" and self.long_factor is None:
            raise ValueError(
                "method longrope needs long_factor (--long-factor FILE with rotary_dim/2 "
                "numbers), or let `ctxext tune` search them"
            )
        if self.long_factor is not None and self.method != "longrope":
            raise ValueError("long_factor applies only to method longrope")
        if self.short_factor is not None and self.method != "longrope":
            raise ValueError("short_factor applies only to method longrope")
        if self.theta_multiplier is not None and self.method != "ntk":
            raise ValueError("theta_multiplier applies only to method ntk")
        return self

    def rope_options(self) -> dict:
        """The method-specific keyword arguments of :func:`ctxext.rope.extend_config`."""
        return self.model_dump(exclude={"method", "factor", "target_length"})


class ExtendJob(StrictModel):
    """`ctxext extend`: config-only extension of one checkpoint."""

    model: str | None = None
    """Model folder, Hub id or bundled short name (default: the bundled model)."""
    output: Path
    """Output folder (created atomically)."""
    extend: ExtendConfig
    link_mode: LinkMode = "hardlink"
    """How weight files reach the output: hardlink (copy where impossible), copy or symlink."""
    overwrite: bool = False
    """Replace an existing output folder."""


class EvalConfig(StrictModel):
    """`ctxext eval`: what to measure, on which data, at which lengths."""

    lengths: list[int]
    """Context lengths in tokens (positive integers)."""
    tasks: list[Task] = ["ppl"]
    """ppl (perplexity and loss by position), passkey (natural-language retrieval),
    context-use (far-context gain) and/or retrieval (key retrieval with a per-model template)."""
    data: str | None = None
    """Text file, folder, .jsonl, Hugging Face dataset name, or None for the default corpus
    (the bundled model's held-out stdlib files)."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and datasets."""
    dataset_config: str | None = None
    """Config (subset) of a Hugging Face dataset, e.g. wikitext-103-raw-v1."""
    dataset_split: str | None = None
    """Split of a Hugging Face dataset; None reads test, else validation."""
    fallback_encoding: str | None = None
    """Encoding for data files that are not UTF-8 (e.g. latin-1); None refuses them."""
    stride: int | None = None
    """Sliding-window stride; None scores each document's first L tokens (YaRN protocol)."""
    num_docs: int | None = None
    """At most this many documents (a seeded sample when capped): the same ones at every length
    under doc_selection 'same'."""
    doc_selection: DocSelection = "same"
    """same: the documents long enough for the longest length are scored at every length (YaRN
    protocol; a sweep changes nothing but the length). per-length: each length scores every
    document long enough for it (more documents at short lengths, different sets)."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Passkey depths, as fractions of the filler placed before the key."""
    passkey_trials: int = 5
    """Random keys per length x depth (passkey and retrieval)."""
    local_window: int | None = None
    """context-use: positions of a local window, BOS + the last local_window-1 tokens, as the
    full pass starts with BOS (default: the trained length of each model)."""
    local_stride: int | None = None
    """context-use: stride of the local windows (default: local_window // 4; 1 is exact)."""
    retrieval_template: RetrievalTemplate = "auto"
    """retrieval: code (a Python constant hidden in held-out code), text (the passkey), or auto
    (code on the default stdlib corpus, text on other data)."""
    include_base: bool = True
    """Also evaluate each model unscaled when scaling methods are given."""
    dtype: Dtype = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    device_map: str | None = None
    """Passed to from_pretrained (e.g. 'auto' to spread a large model with accelerate)."""
    seed: int = 0
    """Seed for document sampling, bootstrap and passkeys."""

    @field_validator("lengths", mode="before")
    @classmethod
    def _length_words(cls, v: Any) -> Any:
        # A recipe may write lengths as the CLI takes them: [1k, 2k] or "256,512,1k".
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list):
            return v
        return [length_word(x) or x if isinstance(x, str) else x for x in items]

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 2 for n in v):
            raise ValueError("lengths must be integers >= 2")
        return sorted(set(v))

    @field_validator("num_docs", "stride", "passkey_trials", "local_window", "local_stride")
    @classmethod
    def _positive_int(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    _encoding = field_validator("fallback_encoding")(known_encoding)

    @model_validator(mode="after")
    def _local(self) -> EvalConfig:
        w, s = self.local_window, self.local_stride
        if w is not None and s is not None and s > w:
            raise ValueError(f"local_stride ({s}) must not exceed local_window ({w})")
        return self

    @property
    def template(self) -> str:
        """The retrieval template in force (auto resolved against the data)."""
        if self.retrieval_template != "auto":
            return self.retrieval_template
        return "code" if self.data is None else "text"

    @field_validator("passkey_depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must be fractions between 0 and 1")
        return v


LrSchedule = Literal["constant", "cosine", "linear"]
TrainablePart = Literal["embed", "norm"]
# Options that may differ between the first attempt and a --resume of the same run.
_RESUME_FREE = ("save_every",)


class FinetuneConfig(StrictModel):
    """`ctxext finetune` options (also the ``finetune:`` section of a recipe)."""

    steps: int = 400
    """Optimizer steps (YaRN: 400)."""
    lr: float = 2e-5
    """Peak learning rate (YaRN: 2e-5; a tiny model or LoRA usually wants more)."""
    warmup_steps: int | float = 0.05
    """Linear warm-up from 0 to lr, read as transformers' TrainingArguments reads it: a whole
    number of steps (YaRN: 20), or a fraction below 1 of ``steps``, rounded up. The default 0.05
    is YaRN's 20 of 400 steps, and 1 step of a 5-step test run (a fixed 20 would keep such a
    run at a fraction of lr throughout). More warm-up steps than steps is refused."""
    lr_schedule: LrSchedule = "constant"
    """After warm-up: constant (YaRN), cosine (to 10% of lr) or linear (to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (YaRN: 0)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (YaRN: 0.9)."""
    adam_beta2: float = 0.95
    """AdamW beta2 (YaRN: 0.95)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    batch_size: int = 1
    """Sequences per process per micro-step; global batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    train_length: int | None = None
    """Tokens per training sequence (default: the target length). With pose: the window W."""
    pose: bool = False
    """PoSE: train on train_length-token windows whose position ids are spread over the whole
    target length (two chunks, the second shifted by a random skip)."""
    lora_rank: int | None = None
    """LoRA rank on every linear projection; None fine-tunes all weights."""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 x rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_trainable: tuple[TrainablePart, ...] = ("embed", "norm")
    """With LoRA, also train these fully (LongLoRA: embeddings and norms matter for long
    context); give an empty list or 'none' to train the adapters only."""
    grad_ckpt: bool = False
    """Gradient checkpointing: recompute activations in the backward pass (less memory)."""
    save_every: int = 50
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    seed: int = 0
    """Seed of data order, PoSE skips and LoRA initialisation."""
    data: str | None = None
    """Training text: 'stdlib' (default: the bundled model's training part), a text file, a
    folder, a .jsonl file or a Hugging Face dataset name."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json files and datasets."""
    dataset_config: str | None = None
    """Config (subset) of a Hugging Face dataset, e.g. wikitext-103-raw-v1."""
    dataset_split: str | None = None
    """Split of a Hugging Face dataset; None reads train."""
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    """Documents in the seeded shuffle buffer a streamed dataset is read through."""
    fallback_encoding: str | None = None
    """Encoding for data files that are not UTF-8 (e.g. latin-1); None refuses them."""
    dtype: Dtype = "auto"
    """Compute dtype: auto = bf16 autocast on CUDA (fp32 master weights), fp32 on CPU."""

    @field_validator("steps", "batch_size", "grad_accum", "shuffle_buffer")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    _encoding = field_validator("fallback_encoding")(known_encoding)

    @field_validator("save_every")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be 0 or a positive integer (got {v})")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, v: int | float) -> int | float:
        if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
            raise ValueError(
                f"must be a whole number of steps or a fraction below 1 of steps (got {v}), "
                "e.g. 20 or 0.05"
            )
        return int(v) if v >= 1 else v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a finite number > 0 (got {v}), e.g. 2e-5")
        return v

    @field_validator("weight_decay", "lora_dropout")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1) (got {v})")
        return v

    @field_validator("adam_beta1", "adam_beta2")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1) (got {v})")
        return v

    @field_validator("max_grad_norm", "lora_alpha")
    @classmethod
    def _positive_float(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    @field_validator("lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be a positive integer (got {v}); omit it for a full fine-tune")
        return v

    @field_validator("train_length")
    @classmethod
    def _train_length(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"must be at least 2 tokens (got {v})")
        return v

    @field_validator("lora_trainable", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        # The CLI and recipes may write "embed,norm"; "none" or "" means adapters only.
        if isinstance(v, str):
            items = [p.strip() for p in v.split(",") if p.strip()]
            return () if items in ([], ["none"]) else tuple(items)
        return v

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> FinetuneConfig:
        if self.warmup() > self.steps:
            # ctx["at"]: the error names finetune.warmup_steps (and its recipe line)
            raise PydanticCustomError(
                "warmup_too_long",
                "{warmup} warm-up steps are more than steps ({steps}): lr would never be "
                "reached; give fewer warm-up steps or a fraction of steps such as 0.05",
                {"warmup": self.warmup(), "steps": self.steps, "at": ("warmup_steps",)},
            )
        return self

    def warmup(self) -> int:
        """Warm-up steps of this run: warmup_steps itself, or that fraction of steps."""
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(w * self.steps)

    @model_validator(mode="after")
    def _pose_needs_window(self) -> FinetuneConfig:
        if self.pose and self.train_length is None:
            raise ValueError(
                "pose needs train_length (the window W, e.g. the trained length): "
                "add --train-length"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The options that define a run (a resume must repeat them)."""
        return self.model_dump(mode="json", exclude=set(_RESUME_FREE))


def parse_model(cls: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` into ``cls``; a failure becomes one CtxextError line naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtxextError(format_validation_error(e, where, cls)) from None


def format_validation_error(
    e: ValidationError,
    where: str,
    cls: type[BaseModel] | None = None,
    position: Callable[[tuple[Any, ...]], str] | None = None,
) -> str:
    """``WHERE: key.sub<position>: problem`` for the first problem, and how many more.

    The one formatter for flags and recipe files alike. ``cls`` (the validated model) lets an
    unknown key list the valid ones; ``position(loc)`` may add where the key was written,
    e.g. `` (line 12)``.
    """
    errors = e.errors()
    err = errors[0]
    # ctx["at"]: a model validator may point at the key its problem is about.
    loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {plural(len(errors) - 1, 'more problem')})" if len(errors) > 1 else ""
    written = position(loc) if position is not None else ""
    return f"{where}: {key}{written}: {_problem(err, loc, cls)}{more}"


def _problem(err: Any, loc: tuple[Any, ...], cls: type[BaseModel] | None) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = model_at(cls, loc[:-1]) if cls is not None else None
        return f"unknown key; expected one of: {keys_of(parent)}" if parent else "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        got = _short_repr(err.get("input"))
        return f"expected {msg.removeprefix('Input should be ')} (got {got})"
    return msg


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` in ``cls`` (None if none)."""
    for part in loc:
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        nested = _model_in(info.annotation)
        if nested is None:
            return None
        cls = nested
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def keys_of(cls: type[BaseModel]) -> str:
    """The keys ``cls`` accepts, comma-separated."""
    return ", ".join(cls.model_fields)


def length_word(item: str) -> int:
    """'512' -> 512, '1k' / '2K' -> 1024 / 2048 (k = 1024); 0 when it is not one."""
    item = item.strip().lower()
    try:
        return int(item.removesuffix("k")) * (1024 if item.endswith("k") else 1)
    except ValueError:
        return 0


def positive_int_list(text: str, what: str = "--lengths") -> list[int]:
    """Parse '256,512,1k,2K' into positive ints (k = 1024)."""
    out = []
    for item in text.split(","):
        value = length_word(item)
        if value <= 0:
            raise CtxextError(
                f"{what} must be positive integers separated by commas (got '{item.strip()}'), "
                "e.g. 256,512,1024"
            )
        out.append(value)
    return out


__all__ = [
    "EvalConfig",
    "ExtendConfig",
    "ExtendJob",
    "FinetuneConfig",
    "format_validation_error",
    "keys_of",
    "length_word",
    "model_at",
    "parse_model",
    "positive_int_list",
]
