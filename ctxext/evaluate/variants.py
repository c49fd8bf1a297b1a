"""The rows of ``ctxext eval``: each *variant* is a checkpoint, optionally with a scaling method
applied in memory (the config is rewritten before the model is built; nothing is written).

Each model is resolved once for the whole command (a Hub model at one commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctxext import locate
from ctxext.config import EvalConfig, ExtendConfig
from ctxext.errors import CtxextError

#: Each model of the command, resolved once (a Hub model pinned to the commit it resolved to:
#: every later fetch of its files is at that commit), by the name the caller gave.
Sources = dict[str | None, locate.ResolvedModel]


@dataclass(frozen=True)
class Variant:
    """One row of the results table."""

    model: str | None
    extend: ExtendConfig | None = None


def plan_variants(
    models: list[str | None],
    methods: list[str],
    extend_options: dict[str, Any],
    cfg: EvalConfig,
) -> list[Variant]:
    """Base rows (unless excluded) and one row per model x method.

    Without --factor/--target-length a method scales to the longest evaluated length, the
    usual question being "how well does it read at the longest length I care about".
    """
    from ctxext.config import parse_model

    if not cfg.include_base and not methods:
        raise CtxextError(
            "--no-base skips the unscaled rows, and without -m/--method nothing is left to "
            "evaluate: add a scaling method (e.g. -m yarn) or drop --no-base"
        )
    opts = dict(extend_options)
    if opts.get("factor") is None and opts.get("target_length") is None:
        opts["target_length"] = max(cfg.lengths)
    variants: list[Variant] = []
    for model in models or [None]:
        if cfg.include_base:
            variants.append(Variant(model))
        for method in methods:
            spec = parse_model(ExtendConfig, {"method": method, **opts}, "extend options")
            variants.append(Variant(model, spec))
    return variants


def resolve_models(models: list[str | None]) -> Sources:
    """Each model resolved once, its config files fetched (a Hub model: at one commit)."""
    sources: Sources = {}
    for model in models:
        if model not in sources:
            sources[model] = locate.resolve_model(model)
    return sources
