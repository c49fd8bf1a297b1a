"""Effective context length: the longest evaluated length up to which (at it and at every
shorter evaluated length) retrieval is >= 90% at every depth and the far-context gain of the
last bucket is positive (its bootstrap interval lies above 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ctxext.evaluate.context_use import ContextUseResult
from ctxext.evaluate.scoring import RETRIEVAL_THRESHOLD, RetrievalResult

EFFECTIVE_LENGTH_RULE = (
    "the longest evaluated length L such that at L and at every shorter evaluated length: "
    "retrieval accuracy >= 90% at every depth, and (for lengths beyond the local window) the "
    "far-context gain of the last position bucket is positive (95% interval above 0); "
    "a task not run does not count against a length"
)


def effective_length(
    lengths: Sequence[int],
    retrieval: RetrievalResult | None,
    gains: dict[int, ContextUseResult] | None,
    threshold: float = RETRIEVAL_THRESHOLD,
) -> int | None:
    """Longest evaluated length L such that, at L and at every shorter evaluated length,
    retrieval is >= ``threshold`` at every depth and, where the length exceeds the local window,
    the last bucket's far-context gain is positive (bootstrap interval above 0).

    A measurement that was not made does not count against a length; None when no length
    qualifies (or nothing was measured).
    """
    if retrieval is None and not gains:
        return None
    best = None
    for n in sorted(lengths):
        ok = True
        if retrieval is not None and n in retrieval.lengths:
            ok = retrieval.retrieves_at(n, threshold)
        gain = (gains or {}).get(n)
        if ok and gain is not None and n > gain.window:
            ok = gain.last_bucket["ci_low"] > 0
        if not ok:
            break
        best = n
    return best


def context_length(info: Any) -> int:
    """The length a variant's config claims (``info``: its ``rope.analyze``): the trained length
    times its scaling factor."""
    from ctxext import rope

    factor = float((info.existing_scaling or {}).get("factor") or 1.0)
    if factor <= 1.0:
        return info.max_position_embeddings
    return max(info.max_position_embeddings, rope.new_length(info.trained_length, factor))
