"""Does a model *use* its extended context? The far-context gain (and what else measures it).

Perplexity at length L cannot tell a model that reads all L tokens from one that reads only the
last few hundred: both can keep a flat perplexity. Three measurements can:

* **Far-context gain** (``context_use``). Every scored token's NLL is measured twice: with its
  full context (BOS and the document's first L-1 tokens, one forward pass of L positions), and
  with its context cut to a local window of W positions (W defaults to the trained length).
  The cut context comes from *fresh* windows, not from a banded attention mask: in a
  multi-layer model each layer widens a band's receptive field by W, so a mask would still let
  far text in through the residual stream. Both passes start alike: each window is the BOS
  and the last W-1 tokens: a model trained with a BOS may lean on position 0 (attention
  sinks), and a window starting mid-text would then be penalised for its odd start, not for
  the text it lost, biasing the gain positive. So the only difference between the passes is
  the far text that was cut. (A tokenizer without BOS: both start with plain text and a window is
  the last W tokens.) L and W count model positions, BOS included, as the trained length does.
  Windows step back from the end by a stride S; each scores the S tokens that follow its last
  S positions, so a scored token reads BOS + W-S to W-1 tokens (S = 1: BOS + exactly its last
  W-1 tokens). A token at position p <= W has no text cut (its full context is BOS + p-1 <=
  W-1 tokens), so its two NLLs are the same number and its gain is exactly 0. The gain is
  ``(NLL_local - NLL_full) / ln 2`` bits per token, by position bucket, with a percentile
  bootstrap over documents. Positive: the model uses text more than W-1 tokens back. Zero or
  negative: it only extrapolates (or is hurt by the far text).
* **LongPPL** (:mod:`ctxext.evaluate.longppl`, its own task): the perplexity of the key
  tokens, those the long context helps most, from another short pass (the reference's chunks).
* **Retrieval** (:mod:`ctxext.evaluate.retrieval`): a key hidden at a depth of the context,
  asked for at the end, in held-out forms and real held-out documents.
* **Effective context length** (:mod:`ctxext.evaluate.effective_length`): the longest length up
  to which both retrieval and the far-context gain hold.

This module is the far-context gain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import (
    Progress,
    accumulate,
    check_head,
    eval_mode,
    final_hidden,
    full_nll_by_length,
    nll_from_hidden,
    reset_rotary_state,
    sweep_sequences,
    token_nll,
)
from ctxext.evaluate.perplexity import bootstrap_ratio
from ctxext.evaluate.protocol import BOOTSTRAP_RESAMPLES, bucket_edges
from ctxext.evaluate.short_pass import short_stride

__all__ = [
    "ContextUseResult",
    "context_use",
    "context_use_sweep",
    "context_use_sweep_tokens",
    "local_nll",
]

_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Far-context gain


def _local_windows(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(last target, number of targets) per window, stepping back from the end by ``stride``.

    Targets are positions p > window (only their full context is longer than a window).
    """
    windows = []
    last = length - 1
    while last > window:
        n = min(stride, last - window)
        windows.append((last, n))
        last -= n
    return windows


def context_use_sweep_tokens(
    n_docs: int, lengths: Sequence[int], window: int, stride: int, one_pass: bool
) -> int:
    """Tokens ``context_use_sweep`` feeds (its progress total): the full passes (one at the
    longest length, or one per length past the window) and the local windows, per document."""
    far = sorted(n for n in set(lengths) if n > window)
    if not far:
        return 0
    full = far[-1] if one_pass else sum(far)
    return n_docs * (full + window * len(_local_windows(far[-1], window, stride)))


def local_nll(
    model: Any,
    seq: Sequence[int],
    window: int,
    stride: int,
    *,
    bos: bool,
    full: torch.Tensor | None = None,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """NLL of tokens 1..L-1 of ``seq`` when each reads a local window of ``window`` positions.

    ``bos``: ``seq[0]`` is the BOS token the full pass starts with, and every window is that
    BOS + the last window-1 tokens (else the last ``window`` tokens); see the module docstring.
    ``full`` (the full-context NLL, ``token_nll(seq)``) fills positions <= window, whose
    context is not cut; it is computed when not given.
    """
    if window < 1 or not 1 <= stride <= window:
        raise CtxextError(
            f"--local-window ({window}) must be >= 1 and --local-stride ({stride}) between 1 "
            "and the window"
        )
    ids = torch.tensor([list(seq)])
    if full is None:
        full = token_nll(model, ids, chunk_size=chunk_size)
    out = full.clone()
    start = ids[:, :1] if bos else ids[:, :0]
    with torch.inference_mode(), eval_mode(model):
        for last, n in _local_windows(len(seq), window, stride):
            # Input: the start (BOS) and the tokens before `last`, exactly `window` in all
            # (never longer, so a length-dependent rope sees a window-sized input); its last n
            # rows predict the targets last-n+1 .. last.
            text = ids[:, last - window + start.shape[1] : last]
            hidden = final_hidden(model, torch.cat([start, text], dim=1), None)
            nll = nll_from_hidden(model, hidden[-n:], ids[0, last - n + 1 : last + 1], chunk_size)
            out[last - n : last] = nll.to(out.device)
            if progress is not None:
                progress(window)
    return out


@dataclass
class ContextUseResult:
    """Far-context gain at one length: bits per token, local minus full, by position bucket."""

    length: int
    window: int
    stride: int
    n_docs: int
    gain_bits: float
    ci_low: float
    ci_high: float
    buckets: list[dict[str, Any]] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def last_bucket(self) -> dict[str, Any]:
        return self.buckets[-1]


def _gain_interval(
    diff: np.ndarray, count: np.ndarray, seed: int, resamples: int
) -> tuple[float, float, float]:
    """Token-weighted mean of per-document sums, and its 95% percentile bootstrap over docs."""
    if count.sum() == 0:
        return 0.0, 0.0, 0.0
    low, high = bootstrap_ratio(diff, count, seed, resamples)
    return float(diff.sum() / count.sum()), low, high


def context_use(
    model: Any,
    sequences: Sequence[Sequence[int]],
    *,
    window: int,
    bos: bool,
    stride: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> ContextUseResult:
    """Far-context gain over ``sequences`` (each exactly one model input of the same length L).

    The caller chooses the sequences (the same documents' first L tokens at every length, as
    the perplexity protocol does); ``bos``: they start with the BOS token, which every local
    window keeps (:func:`local_nll`); ``stride`` defaults to window // 4 (:func:`~ctxext.evaluate.short_pass.short_stride`).
    """
    if not sequences:
        raise CtxextError("context-use needs at least one document")
    length = len(sequences[0])
    if any(len(s) != length for s in sequences):
        raise ValueError("every sequence must have the same length")
    stride = stride or short_stride(window)
    fulls, locals_ = [], []
    tick = accumulate(progress)

    check_head(model, sequences[0])
    for seq in sequences:
        reset_rotary_state(model)  # a length-dependent rope starts from its initial state
        full = token_nll(model, torch.tensor([list(seq)]), chunk_size=chunk_size)
        tick(length)
        fulls.append(full.double())
        reset_rotary_state(model)  # and the windows get the frequencies of a short input
        local = local_nll(
            model, seq, window, stride, bos=bos, full=full, chunk_size=chunk_size, progress=tick
        )
        locals_.append(local.double())
    return _gain_result(fulls, locals_, length, window, stride, seed, bos)


def _gain_result(
    fulls: Sequence[torch.Tensor],
    locals_: Sequence[torch.Tensor],
    length: int,
    window: int,
    stride: int,
    seed: int,
    bos: bool,
) -> ContextUseResult:
    """Tally (local - full) / ln 2 per document and position bucket, with bootstrap intervals."""
    edges = bucket_edges(length)
    n_buckets = len(edges) - 1
    diff = np.zeros((len(fulls), n_buckets))
    count = np.zeros((len(fulls), n_buckets), dtype=np.int64)
    full_sum = np.zeros(n_buckets)
    # Positions 1..L-1 are scored; which bucket each falls into.
    which = np.searchsorted(edges, np.arange(1, length), side="right") - 1
    for d, (full, local) in enumerate(zip(fulls, locals_, strict=True)):
        delta = (local - full).cpu().numpy() / _LN2
        np.add.at(diff[d], which, delta)
        np.add.at(count[d], which, 1)
        np.add.at(full_sum, which, full.cpu().numpy() / _LN2)
    buckets = []
    for b in range(n_buckets):
        mean, low, high = _gain_interval(diff[:, b], count[:, b], seed + b, BOOTSTRAP_RESAMPLES)
        n = int(count[:, b].sum())
        buckets.append(
            {
                "start": edges[b],
                "end": edges[b + 1],
                "gain_bits": mean,
                "ci_low": low,
                "ci_high": high,
                "full_bits": float(full_sum[b] / n) if n else None,
                "n_tokens": n,
            }
        )
    far = max(0, length - 1 - window)  # positions window+1 .. L-1
    total_mean, total_low, total_high = _gain_interval(
        diff.sum(axis=1), np.full(len(fulls), far), seed, BOOTSTRAP_RESAMPLES
    )
    return ContextUseResult(
        length=length,
        window=window,
        stride=stride,
        n_docs=len(fulls),
        gain_bits=total_mean,
        ci_low=total_low,
        ci_high=total_high,
        buckets=buckets,
        protocol=context_use_protocol(window, stride, seed, bos),
    )


def context_use_sweep(
    model: Any,
    sequences: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    window: int,
    bos: bool,
    stride: int | None = None,
    seed: int = 0,
    one_pass: bool = True,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> dict[int, ContextUseResult]:
    """Far-context gain at every length longer than ``window``, on the same documents.

    ``sequences`` are the documents' first max(lengths) tokens (``bos``: BOS first); at length L
    each is cut to its first L. The local NLL of position p reads only the BOS and tokens
    p-W+1..p-1, which are the same at every length, so it is computed once per document. The
    full-context NLL at L comes from :func:`~ctxext.evaluate.loss.full_nll_by_length`: a prefix
    of one pass at the longest length when the rope is static (``one_pass``), a fresh pass per
    length after a rotary reset when it is length-dependent (dynamic NTK).
    """
    stride = stride or short_stride(window)
    todo = sorted(n for n in set(lengths) if n > window)
    if not todo:
        return {}
    longest = todo[-1]
    tick = accumulate(progress)
    seqs = sweep_sequences(model, sequences, longest)

    fulls: dict[int, list[torch.Tensor]] = {n: [] for n in todo}
    locals_: list[torch.Tensor] = []
    for seq in seqs:
        by_length = full_nll_by_length(
            model, seq, todo, one_pass=one_pass, chunk_size=chunk_size, tick=tick
        )
        for n in todo:
            fulls[n].append(by_length[n])
        full = by_length[longest]
        reset_rotary_state(model)  # windows are no longer than the trained length
        # Only positions > window have text to cut; the rest is each length's own full NLL.
        local = local_nll(model, seq, window, stride, bos=bos, full=full, progress=tick)
        locals_.append(local[window:])
    results = {}
    for n in todo:
        fs = [f.double() for f in fulls[n]]
        ls = [
            torch.cat([f[:window], tail[: n - 1 - window].double()])
            for f, tail in zip(fs, locals_, strict=True)
        ]
        results[n] = _gain_result(fs, ls, n, window, stride, seed, bos)
    return results


def context_use_protocol(window: int, stride: int, seed: int, bos: bool) -> dict[str, Any]:
    if bos:
        reads = f"BOS + {window - stride} to {window - 1} tokens"
        start = f"BOS + the last {window - 1} tokens, starting as the full pass does"
    else:
        reads, start = f"{window - stride + 1} to {window} tokens", f"the last {window} tokens"
    return {
        "name": "context-use",
        "description": (
            f"far-context gain: NLL with the context cut to a local window of {window} positions "
            "minus NLL with the full context, in bits per token (local - full) / ln 2; the cut "
            f"context comes from fresh windows ({start}) stepping back by {stride} (each "
            f"scored token reads {reads}), not from an attention mask; tokens at positions "
            f"<= {window} have nothing to cut (gain 0)"
        ),
        "local_window": window,
        "local_stride": stride,
        "local_start": "BOS (as the full pass)" if bos else "text (no BOS token)",
        "gain_bits": "token-weighted over the tokens more than the window from the start",
        "interval": f"95% percentile bootstrap over documents, {BOOTSTRAP_RESAMPLES} "
        f"resamples, seed {seed} (+ bucket index per bucket)",
    }
