"""`ctxext extend`: how to rewrite the rotary configuration, and the extend job."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    field_validator,
    model_serializer,
    model_validator,
)

from ctxext.config.base import StrictModel, one_of
from ctxext.rope.methods import ALL_METHODS, KEEP_SHORT_METHODS, OPTION_DEFAULTS

Method = Literal[ALL_METHODS]  # type: ignore[valid-type]  # the names defined in ctxext.rope
LinkMode = Literal["hardlink", "copy", "symlink"]


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
    keep_short: bool = False
    """linear, ntk, yarn, llama3: write the method as longrope factors used past the trained
    length only, keeping the trained frequencies up to it (transformers picks the set per
    forward pass from the longest position). YaRN's attention factor applies at every length;
    give attention_factor 1 for a short mode identical to the trained model."""

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        return one_of(v, ALL_METHODS, "method")

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
                "method longrope needs long_factor (rotary_dim/2 numbers), or let `ctxext tune` "
                "search them"
            )
        if self.long_factor is not None and self.method != "longrope":
            raise ValueError("long_factor applies only to method longrope")
        if self.short_factor is not None and self.method != "longrope":
            raise ValueError("short_factor applies only to method longrope")
        if self.keep_short and self.method not in KEEP_SHORT_METHODS:
            raise ValueError(
                f"keep_short applies to {', '.join(KEEP_SHORT_METHODS)}; {self.method} sets "
                "its short-length frequencies itself"
            )
        if self.theta_multiplier is not None and self.method != "ntk":
            raise ValueError("theta_multiplier applies only to method ntk")
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_keep_short(self, handler: Any) -> Any:
        # Recorded only when set: recipes, runs and provenance written before it stay the same.
        out = handler(self)
        if isinstance(out, dict) and not out.get("keep_short"):
            out.pop("keep_short", None)
        return out

    def label(self, factor: float) -> str:
        """How rows and reports name this extension: 'yarn x8', or 'yarn x8 keep-short'."""
        return f"{self.method} x{factor:g}" + (" keep-short" if self.keep_short else "")

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
