"""Perplexity, bits per byte, position buckets and the bootstrap interval over a sweep of
lengths (the protocols are in :mod:`ctxext.evaluate.protocol`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ctxext.evaluate.loss import (
    Progress,
    check_head,
    eval_mode,
    length_dependent_rope,
    reset_rotary_state,
    token_nll,
)
from ctxext.evaluate.protocol import (
    BOOTSTRAP_RESAMPLES,
    DocSelection,
    ForwardPass,
    bucket_edges,
    doc_fingerprint,
    perplexity_protocol,
    plan_passes,
)


@dataclass
class PerplexityResult:
    """Token-weighted perplexity at one length, with its interval and per-position buckets.

    ``bits_per_byte`` = nll_sum / (ln 2 x n_bytes), ``n_bytes`` being the UTF-8 bytes of the
    scored tokens' text: comparable across tokenizers, where perplexity is not.
    ``doc_fingerprint`` identifies the scored documents (equal at every length under the
    ``same`` selection).
    """

    length: int
    ppl: float
    nll_sum: float
    n_tokens: int
    n_docs: int
    ci_low: float
    ci_high: float
    buckets: list[dict[str, Any]] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    n_bytes: int | None = None
    bits_per_byte: float | None = None
    bytes_per_token: float | None = None
    doc_fingerprint: str = ""
    passes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ppl(nll_sum: float, n_tokens: int) -> float:
    # exp overflows to inf for a hopeless model; that is an honest answer, not an error.
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf


def _bpb(nll_sum: float, n_bytes: int | None) -> float | None:
    """Bits per byte: the NLL in nats converted to bits, per UTF-8 byte of scored text."""
    return nll_sum / (math.log(2) * n_bytes) if n_bytes else None


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Percentile 95% interval of sum(num) / sum(den), resampling documents with replacement
    (a resample whose denominator is 0 counts as 0)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(resamples, len(num)))
    n = den[idx].sum(axis=1)
    ratios = np.where(n > 0, num[idx].sum(axis=1) / np.maximum(n, 1), 0.0)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _bootstrap(
    doc_nll: np.ndarray, doc_tokens: np.ndarray, seed: int, resamples: int
) -> tuple[float, float]:
    """Percentile 95% interval of the token-weighted PPL, resampling documents."""
    low, high = bootstrap_ratio(doc_nll, doc_tokens, seed, resamples)
    # Percentiles of the mean NLL map to percentiles of PPL (exp is monotonic).
    return _ppl(low, 1), _ppl(high, 1)


class _Tally:
    """Sums for one length: per document, per position bucket, tokens and bytes."""

    def __init__(self, length: int, docs: list[int], with_bytes: bool) -> None:
        self.length = length
        self.slot = {d: k for k, d in enumerate(docs)}
        self.edges = bucket_edges(length)
        nb = len(self.edges) - 1
        self.bucket_nll, self.bucket_n = np.zeros(nb), np.zeros(nb, dtype=np.int64)
        self.bucket_bytes = np.zeros(nb, dtype=np.int64) if with_bytes else None
        self.doc_nll, self.doc_n = np.zeros(len(docs)), np.zeros(len(docs), dtype=np.int64)

    def add(
        self, doc: int, nll: np.ndarray, positions: np.ndarray, nbytes: np.ndarray | None
    ) -> None:
        """``nll[j]`` predicts the token at model-input position ``positions[j]``."""
        k = self.slot[doc]
        self.doc_nll[k] += nll.sum()
        self.doc_n[k] += len(nll)
        which = np.searchsorted(self.edges, positions, side="right") - 1
        np.add.at(self.bucket_nll, which, nll)
        np.add.at(self.bucket_n, which, 1)
        if self.bucket_bytes is not None and nbytes is not None:
            np.add.at(self.bucket_bytes, which, nbytes)

    def result(self, seed: int, protocol: dict[str, Any], fingerprint: str, passes: str):
        nll_sum, n_tokens = float(self.doc_nll.sum()), int(self.doc_n.sum())
        ci_low, ci_high = _bootstrap(self.doc_nll, self.doc_n, seed, BOOTSTRAP_RESAMPLES)
        n_bytes = None if self.bucket_bytes is None else int(self.bucket_bytes.sum())
        buckets = []
        for b in range(len(self.edges) - 1):
            bucket_bytes = None if self.bucket_bytes is None else int(self.bucket_bytes[b])
            n = int(self.bucket_n[b])
            buckets.append(
                {
                    "start": self.edges[b],
                    "end": self.edges[b + 1],
                    "ppl": _ppl(self.bucket_nll[b], n) if n else None,
                    "n_tokens": n,
                    "nll_sum": float(self.bucket_nll[b]),
                    "n_bytes": bucket_bytes,
                    "bits_per_byte": _bpb(float(self.bucket_nll[b]), bucket_bytes),
                }
            )
        return PerplexityResult(
            length=self.length,
            ppl=_ppl(nll_sum, n_tokens),
            nll_sum=nll_sum,
            n_tokens=n_tokens,
            n_docs=len(self.slot),
            ci_low=ci_low,
            ci_high=ci_high,
            buckets=buckets,
            protocol=protocol,
            n_bytes=n_bytes,
            bits_per_byte=_bpb(nll_sum, n_bytes),
            bytes_per_token=n_bytes / n_tokens if n_bytes is not None and n_tokens else None,
            doc_fingerprint=fingerprint,
            passes=passes,
        )


def _run_pass(
    model: Any,
    p: ForwardPass,
    tallies: dict[int, _Tally],
    token_bytes: Sequence[Sequence[int]] | None,
    prefix: int,
    chunk_size: int | None,
) -> None:
    """Forward the pass's windows and add each served length's share to its tally."""
    doc_bytes = None if token_bytes is None else np.asarray(token_bytes[p.doc], dtype=np.int64)
    for w in p.windows:
        nll = token_nll(model, torch.tensor([p.seq[w.begin : w.end]]), chunk_size=chunk_size)
        # nll[j] scores window position j+1; keep positions first-begin .. end-begin-1.
        nll = nll[w.first - w.begin - 1 :].double().cpu().numpy()
        positions = np.arange(w.first - w.begin, w.end - w.begin)
        for n in p.serves:
            # One-pass: length n is the prefix of n input positions (targets 1..n-1).
            keep = positions < n if n < p.length else slice(None)
            nbytes = None
            if doc_bytes is not None:  # document token index = input position - BOS
                nbytes = doc_bytes[positions[keep] + w.begin - prefix]
            tallies[n].add(p.doc, nll[keep], positions[keep], nbytes)


@torch.inference_mode()
def evaluate_lengths(
    model: Any,
    doc_token_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    bos_token_id: int | None,
    stride: int | None = None,
    num_docs: int | None = None,
    seed: int = 0,
    doc_selection: DocSelection = "same",
    token_bytes: Sequence[Sequence[int]] | None = None,
    one_pass: bool = True,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> dict[int, PerplexityResult]:
    """Perplexity at every length of ``lengths`` (see the module docstring for the protocols).

    ``doc_selection='same'`` scores the documents eligible at the longest length at every
    length. With ``one_pass`` (and the truncate protocol, and a rope whose frequencies do not
    depend on the input's length) each document runs once, at its longest length, and shorter
    lengths are read from that pass's prefix; otherwise each length has its own passes, with
    the rotary state reset before each length. ``token_bytes`` (per-token UTF-8 byte counts,
    :func:`tokenize_for_eval`) adds bits per byte. ``progress(tokens_done)`` is called after
    every forward pass; the total is :func:`~ctxext.evaluate.protocol.perplexity_sweep_tokens` with the same arguments.
    """
    one_pass = one_pass and not length_dependent_rope(model)
    plan = plan_passes(
        doc_token_ids, lengths, bos_token_id, stride, num_docs, seed, doc_selection, one_pass
    )
    prefix = 0 if bos_token_id is None else 1
    check_head(model, plan.passes[0].seq)
    tallies = {n: _Tally(n, docs, token_bytes is not None) for n, docs in plan.selection.items()}
    done, current = 0, None
    with eval_mode(model):
        for p in plan.passes:
            # Per-length passes come grouped by length: a reset before each length makes
            # length-dependent rope (dynamic NTK) exact whatever ran before.
            if current is None or (p.length != current and not plan.one_pass):
                reset_rotary_state(model)
            current = p.length
            _run_pass(model, p, tallies, token_bytes, prefix, chunk_size)
            done += p.tokens
            if progress is not None:
                progress(done)
    passes = (
        "one forward pass per document at its longest length; shorter lengths are its prefixes"
        if plan.one_pass
        else "separate forward passes per length"
    )
    return {
        n: tally.result(
            seed,
            perplexity_protocol(
                n, list(plan.selection), bos_token_id, stride, num_docs, seed, doc_selection
            ),
            doc_fingerprint(plan.selection[n], doc_token_ids),
            passes,
        )
        for n, tally in tallies.items()
    }


def evaluate_perplexity(
    model: Any,
    doc_token_ids: Sequence[Sequence[int]],
    length: int,
    *,
    bos_token_id: int | None,
    stride: int | None = None,
    num_docs: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Progress | None = None,
    token_bytes: Sequence[Sequence[int]] | None = None,
) -> PerplexityResult:
    """Perplexity at one ``length``: :func:`evaluate_lengths` with that length alone.

    ``progress(tokens_done)`` is called after every forward pass with the cumulative number of
    tokens fed so far; the total is ``planned_tokens(...)`` with the same arguments.
    """
    return evaluate_lengths(
        model,
        doc_token_ids,
        [length],
        bos_token_id=bos_token_id,
        stride=stride,
        num_docs=num_docs,
        seed=seed,
        token_bytes=token_bytes,
        chunk_size=chunk_size,
        progress=progress,
    )[length]
