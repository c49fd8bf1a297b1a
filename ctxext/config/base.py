"""What every config model shares: the strict base model, the compute dtype names, the
text-encoding validator, comma-separated lists, the name matcher (case-insensitive, "did you
mean") and the length list parser of the flags."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
)

from ctxext.errors import CtxextError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"] | None


def comma_list(v: Any) -> Any:
    """'a,b' or ['a,b', 'c'] -> ['a', 'b', 'c']: list values the flags and recipes may write
    comma-separated, repeated, or both (a ``mode="before"`` validator); others unchanged."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list | tuple):
        return v
    out: list[Any] = []
    for item in items:
        out += [p.strip() for p in item.split(",")] if isinstance(item, str) else [item]
    return out


def known_encoding(v: str | None) -> str | None:
    """A codec name Python knows (validator shared by the eval and finetune configs)."""
    import codecs

    if v is not None:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (try latin-1 or cp1252)") from None
    return v


def one_of(value: Any, names: Sequence[str], what: str) -> Any:
    """``value`` as one of ``names``, whatever its case (`YaRN` is `yarn`); a near miss is
    refused with "did you mean", anything else with the list. Non-strings pass through (the
    field's type refuses them)."""
    if not isinstance(value, str):
        return value
    lowered = {name.lower(): name for name in names}
    found = lowered.get(value.strip().lower())
    if found is not None:
        return found
    import difflib

    close = difflib.get_close_matches(value.strip().lower(), list(lowered), n=1, cutoff=0.6)
    hint = f"; did you mean '{lowered[close[0]]}'?" if close else ""
    raise ValueError(f"unknown {what} '{value}'{hint} (one of: {', '.join(names)})")


def each_one_of(value: Any, names: Sequence[str], what: str) -> Any:
    """:func:`one_of` for every item of a list (anything else passes through)."""
    if not isinstance(value, list | tuple):
        return value
    return [one_of(x, names, what) for x in value]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable.

    Field docstrings document the fields in the source (and in recipe files); pydantic is not
    asked to extract them (``use_attribute_docstrings`` parses each class's source at import,
    which every `ctxext` start-up would pay). Schemas are built on first use (``defer_build``),
    so a command validates only the models it needs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


def length_word(item: str) -> int:
    """'512' -> 512, '1k' / '2K' -> 1024 / 2048 (k = 1024); 0 when it is not one."""
    item = item.strip().lower()
    try:
        return int(item.removesuffix("k")) * (1024 if item.endswith("k") else 1)
    except ValueError:
        return 0


def fraction_list(text: str, what: str) -> list[float]:
    """Parse '0,0.5,1' into floats between 0 and 1 (retrieval depths)."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:
            raise CtxextError(
                f"{what} must be fractions between 0 and 1 separated by commas (got "
                f"'{item.strip()}'), e.g. 0,0.5,1"
            )
        out.append(value)
    return out


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
