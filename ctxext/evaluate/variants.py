"""The rows of ``ctxext eval``: each *variant* is a checkpoint, optionally with a scaling method
applied in memory (the config is rewritten before the model is built; nothing is written).

Each model is resolved once for the whole command (a Hub model at one commit).
"""

from __future__ import annotations

from collections.abc import Callable
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


def loader(
    cfg: EvalConfig,
    sources: Sources,
    tokenizer_of: Callable[[locate.ResolvedModel], Any],
    trust_remote_code: bool,
    allow_pickle: bool,
    progress: Any,
) -> Callable[..., Any]:
    """``load(model, extend=None, rope_as_trained=False)``: a model of ``sources`` loaded with
    the config's dtype, devices and attention, and the tokenizer ``tokenizer_of`` gives
    (:func:`ctxext.modeling.load_causal_lm`; ``progress`` draws weight downloads)."""
    from ctxext.modeling import load_causal_lm

    common = {
        "dtype": cfg.dtype,
        "device_map": cfg.device_map,
        "trust_remote_code": trust_remote_code,
        "allow_pickle": allow_pickle,
        "progress": progress,
        "attn_implementation": cfg.attn_implementation,
    }

    def load(model: str | None, extend: ExtendConfig | None = None, rope_as_trained: bool = False):
        source = sources[model]
        return load_causal_lm(
            source,
            extend=extend,
            tokenizer=tokenizer_of(source),
            rope_as_trained=rope_as_trained,
            **common,
        )

    return load
