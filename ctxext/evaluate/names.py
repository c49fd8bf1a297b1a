"""Random names and keys for retrieval needles: the name shapes of :mod:`ctxext.evaluate.needles`
(``TOKEN_7F3A``, ``max_retry_3a``, ``maxRetry3A``, ``Falcon Ridge 42``) and 5-digit keys."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ctxext.errors import CtxextError

if TYPE_CHECKING:  # numpy only for annotations: the config layer imports this module
    import numpy as np

__all__ = ["NameShape", "random_key", "random_name"]

NameShape = Literal["upper", "snake", "camel", "title"]

# Identifier words for snake/camel names and prose names: common in code, so that the name is
# made of ordinary tokens and the model must match it, not spot a rare token.
_WORDS = [
    "max",
    "min",
    "size",
    "count",
    "limit",
    "retry",
    "timeout",
    "buffer",
    "cache",
    "index",
    "offset",
    "width",
    "height",
    "depth",
    "level",
    "port",
    "block",
    "chunk",
    "page",
    "batch",
    "queue",
    "delay",
    "score",
    "total",
    "value",
    "rate",
    "step",
    "window",
    "frame",
    "seed",
]
_PLACES = [
    "Falcon",
    "Harbor",
    "Cedar",
    "Willow",
    "Granite",
    "Amber",
    "Silver",
    "Maple",
    "Raven",
    "Summit",
    "Hollow",
    "Meadow",
    "Copper",
    "Orchid",
    "Beacon",
    "Marble",
    "Juniper",
    "Canyon",
    "Crystal",
    "Lantern",
]
_PLACE_KINDS = [
    "Ridge",
    "Bay",
    "Point",
    "Lake",
    "Station",
    "Gate",
    "Valley",
    "Court",
    "Field",
    "Tower",
]


def random_key(rng: np.random.Generator) -> str:
    """A retrieval key: a random 5-digit number (as the passkey of Mohtashami & Jaggi)."""
    return str(int(rng.integers(10_000, 100_000)))


def random_name(rng: np.random.Generator, shape: NameShape = "upper") -> str:
    """A random name of the given shape.

    upper: ``TOKEN_7F3A`` (four hex digits); snake: ``max_retry_3a``; camel: ``maxRetry3A``;
    title: ``Falcon Ridge 42``. Each has thousands of values, so a sequence with several
    needles rarely repeats one (callers deduplicate anyway).
    """
    if shape == "upper":
        return f"TOKEN_{int(rng.integers(0, 16**4)):04X}"
    a, b = (_WORDS[i] for i in rng.choice(len(_WORDS), 2, replace=False))
    tag = int(rng.integers(0, 256))
    if shape == "snake":
        return f"{a}_{b}_{tag:02x}"
    if shape == "camel":
        return f"{a}{b.capitalize()}{tag:02X}"
    if shape == "title":
        place = _PLACES[int(rng.integers(0, len(_PLACES)))]
        kind = _PLACE_KINDS[int(rng.integers(0, len(_PLACE_KINDS)))]
        return f"{place} {kind} {tag}"
    raise CtxextError(f"unknown name shape {shape!r}")
