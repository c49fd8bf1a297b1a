"""`ctxext tune`: what to search, on which data, with which budget."""

from __future__ import annotations

from typing import Any

from pydantic import (
    Field,
    field_validator,
)

from ctxext.config.base import StrictModel, each_one_of
from ctxext.rope.methods import FACTOR_LIST_METHODS

#: What `ctxext tune` searches unless told, in this order (a search's seeded draws follow it):
#: every method but dynamic, which rescales at run time and has nothing to tune.
TUNE_METHODS: tuple[str, ...] = ("yarn", "ntk", "linear", "llama3", *FACTOR_LIST_METHODS)


class TuneConfig(StrictModel):
    """`ctxext tune`: what to search, on which data, with which budget."""

    model: str | None = None
    target_length: int
    methods: list[str] = Field(default_factory=lambda: list(TUNE_METHODS))
    """Methods to search (see TUNE_METHODS)."""
    budget_minutes: float = 15.0
    """Wall-clock budget of the search (the report afterwards is extra)."""
    budget_evals: int | None = None
    """Budget in document forwards at the target length; overrides budget_minutes and makes a
    search machine-independent (tune.json records the one used)."""
    search_docs: int = 8
    report_docs: int = 16
    guard: float = 0.05
    """Reject candidates whose perplexity at the trained length exceeds the unscaled model's by
    more than this fraction."""
    report_lengths: list[int] | None = None
    """Leaderboard lengths (default: the trained length and the target length)."""
    data: str | None = None
    seed: int = 0

    @field_validator("methods", mode="before")
    @classmethod
    def _method_names(cls, v: Any) -> Any:
        # Names whatever their case (YaRN is yarn); a near miss gets "did you mean".
        return each_one_of(v, TUNE_METHODS, "method")
