"""Typed configuration: one schema for the CLI flags and for recipe files.

Each command builds one of these models from its flags; a recipe holds the same models
under its keys. Validation of values lives here (pydantic); validation against a particular
checkpoint (trained length, architecture) lives in :mod:`ctxext.rope`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ctxext.errors import CtxextError

Method = Literal["linear", "ntk", "yarn", "dynamic", "llama3"]
LinkMode = Literal["hardlink", "copy", "symlink"]
Task = Literal["ppl", "passkey"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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
    dynamic (dynamic NTK) or llama3 (Llama-3.1-style)."""
    factor: float | None = None
    """Scale factor s = new context length / trained length (> 1)."""
    target_length: int | None = None
    """New context length in tokens; the factor is derived from it. Give factor or this."""
    beta_fast: float = 32.0
    """YaRN: pairs turning more than beta_fast times within the trained length are kept."""
    beta_slow: float = 1.0
    """YaRN: pairs turning fewer than beta_slow times are fully interpolated."""
    attention_factor: float | None = None
    """YaRN: scale of cos/sin (softmax temperature); default 0.1 ln(s) + 1."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above trained_length / low_freq_factor are divided by s."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below trained_length / high_freq_factor are kept."""

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

    @model_validator(mode="after")
    def _one_of(self) -> ExtendConfig:
        if (self.factor is None) == (self.target_length is None):
            raise ValueError("give exactly one of factor and target_length")
        if self.beta_fast <= self.beta_slow:
            raise ValueError("beta_fast must be greater than beta_slow")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
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
    """ppl (perplexity and loss by position) and/or passkey (retrieval accuracy)."""
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
    """At most this many documents per length (a seeded sample when capped)."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Passkey depths, as fractions of the filler placed before the key."""
    passkey_trials: int = 5
    """Random keys per length x depth."""
    include_base: bool = True
    """Also evaluate each model unscaled when scaling methods are given."""
    dtype: Dtype = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    device_map: str | None = None
    """Passed to from_pretrained (e.g. 'auto' to spread a large model with accelerate)."""
    seed: int = 0
    """Seed for document sampling, bootstrap and passkeys."""

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 2 for n in v):
            raise ValueError("lengths must be integers >= 2")
        return sorted(set(v))

    @field_validator("num_docs", "stride", "passkey_trials")
    @classmethod
    def _positive_int(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    _encoding = field_validator("fallback_encoding")(known_encoding)

    @field_validator("passkey_depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must be fractions between 0 and 1")
        return v


def parse_model(cls: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` into ``cls``; a failure becomes one CtxextError line naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtxextError(format_validation_error(e, where)) from None


def format_validation_error(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(e.errors()) - 1} more problems)" if len(e.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def positive_int_list(text: str, what: str = "--lengths") -> list[int]:
    """Parse '256,512,1k,2K' into positive ints (k = 1024)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1024 if item.endswith("k") else 1
        try:
            value = int(item.removesuffix("k")) * mult
        except ValueError:
            value = 0
        if value <= 0:
            raise CtxextError(
                f"{what} must be positive integers separated by commas (got '{item}'), "
                "e.g. 256,512,1024"
            )
        out.append(value)
    return out


__all__ = [
    "EvalConfig",
    "ExtendConfig",
    "ExtendJob",
    "format_validation_error",
    "parse_model",
    "positive_int_list",
]
