"""The two tasks of ``ctxext eval`` that score whole documents with a cut context, as
:mod:`ctxext.evaluate.run` calls them: context-use (the far-context gain,
:mod:`~ctxext.evaluate.context_use`) and longppl (LongPPL's key tokens,
:mod:`~ctxext.evaluate.longppl`). Here the config is read and each task called with plain
arguments; both read the same documents (those that hold the longest length) and the same
``--local-window`` W (default: the trained length) and ``--local-stride`` S (default W/4),
each with its own short pass: the gain's windows of at most W positions, LongPPL's chunks of
W + S positions (the reference's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ctxext.config import EvalConfig

#: ticker(description, total_tokens) -> progress(tokens_done)
Ticker = Callable[[str, int], Callable[[int], None]]


def selection(cfg: EvalConfig, bos: int | None) -> dict[str, Any]:
    """How the context tasks pick their documents: the same at every length (those that hold
    the longest), a seeded sample of ``--num-docs``."""
    return {"bos_token_id": bos, "num_docs": cfg.num_docs, "seed": cfg.seed}


def _plan(
    loaded: Any, tokens: Any, cfg: EvalConfig, trained_length: int
) -> tuple[list[int], dict[str, Any]]:
    """The documents' indices, and the task's arguments: their first max(lengths) tokens (BOS
    first when there is one), the lengths, W, S, whether one pass serves every length, the
    BOS. ``tokens``: the run's tokenized data (its ``docs.ids`` and ``bos_token_id``)."""
    from ctxext.evaluate.loss import length_dependent_rope
    from ctxext.evaluate.protocol import select_documents
    from ctxext.evaluate.short_pass import short_stride

    bos = tokens.bos_token_id
    prefix = [] if bos is None else [bos]
    longest = max(cfg.lengths)
    docs = select_documents(tokens.docs.ids, cfg.lengths, **selection(cfg, bos))[longest]
    window = cfg.local_window or trained_length
    return docs, {
        "sequences": [(prefix + list(tokens.docs.ids[d]))[:longest] for d in docs],
        "lengths": cfg.lengths,
        "window": window,
        "stride": cfg.local_stride or short_stride(window),
        "one_pass": not length_dependent_rope(loaded.model),
        "bos": bos is not None,
    }


def _total(sweep_tokens: Callable[..., int], args: dict[str, Any]) -> int:
    """The progress total of a sweep with these arguments (at least 1)."""
    n = len(args["sequences"])
    keys = ("lengths", "window", "stride", "one_pass")
    return max(1, sweep_tokens(n, *(args[k] for k in keys)))


def context_use_task(
    loaded: Any, tokens: Any, cfg: EvalConfig, trained_length: int, ticker: Ticker
) -> tuple[dict[int, Any], str]:
    """The far-context gain at every length past the window, and the documents' fingerprint."""
    from ctxext.evaluate.context_use import context_use_sweep, context_use_sweep_tokens
    from ctxext.evaluate.protocol import doc_fingerprint

    docs, args = _plan(loaded, tokens, cfg, trained_length)
    total = _total(context_use_sweep_tokens, args)
    progress = ticker(f"{loaded.label} context-use", total)
    results = context_use_sweep(loaded.model, **args, seed=cfg.seed, progress=progress)
    return results, doc_fingerprint(docs, tokens.docs.ids)


def longppl_task(
    loaded: Any, tokens: Any, cfg: EvalConfig, trained_length: int, ticker: Ticker
) -> dict[str, dict[str, Any]]:
    """LongPPL at every length with a cut token, as results.json holds it (length -> result,
    with the documents' fingerprint)."""
    from ctxext.evaluate.longppl import longppl_sweep, longppl_sweep_tokens
    from ctxext.evaluate.protocol import doc_fingerprint

    docs, args = _plan(loaded, tokens, cfg, trained_length)
    total = _total(longppl_sweep_tokens, args)
    results = longppl_sweep(loaded.model, **args, progress=ticker(f"{loaded.label} longppl", total))
    fingerprint = doc_fingerprint(docs, tokens.docs.ids)
    return {str(n): {**r.to_dict(), "doc_fingerprint": fingerprint} for n, r in results.items()}
