"""Does a model *use* its extended context? The far-context gain (and what else measures it).

Perplexity at length L cannot tell a model that reads all L tokens from one that reads only the
last few hundred: both can keep a flat perplexity. Three measurements can:

* **Far-context gain** (``context_use``). Every scored token's NLL is measured twice: with its
  full context (BOS and the document's first L-1 tokens, one forward pass of L positions), and
  with its context cut to a short one of at least W positions (W defaults to the trained
  length), as LongPPL's short pass cuts it (:func:`local_nll`: short chunks of W + S positions
  starting every S positions, S defaulting to W/4, so a token past position W + S - 1 reads
  its last W to W + S - 1 positions). The cut context comes from *fresh* chunks, not from a
  banded attention mask: in a multi-layer model each layer widens a band's receptive field by
  W, so a mask would still let far text in through the residual stream. Both passes start
  alike: each chunk starts with the BOS (in place of its first text token): a model trained
  with a BOS may lean on position 0 (attention sinks), and a chunk starting mid-text would then
  be penalised for its odd start, not for the text it lost, biasing the gain positive. So the
  only difference between the passes is the far text that was cut. (A tokenizer without BOS:
  both start with plain text, as in the reference.) L, W and S count model positions, BOS
  included, as the trained length does. A token at position p < W + S has no text cut (its
  short chunk starts at 0), so its two NLLs are the same number and its gain is exactly 0.
  The gain is ``(NLL_short - NLL_full) / ln 2`` bits per token, by position bucket, with a
  percentile bootstrap over documents. Positive: the model uses text more than W tokens back.
  Zero or negative: it only extrapolates (or is hurt by the far text).
  The same pass picks LongPPL's key tokens (Fang et al. 2024): gain above
  KEY_TOKEN_GAIN_NATS nats *and* full-context NLL below KEY_TOKEN_MAX_NLL (:func:`key_token_ppl`).
* **Retrieval** (:mod:`ctxext.evaluate.retrieval`): a key hidden at a depth of the context,
  asked for at the end, in held-out forms and real held-out documents.
* **Effective context length** (:mod:`ctxext.evaluate.effective_length`): the longest length up
  to which both retrieval and the far-context gain hold.

This module is the far-context gain.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import (
    Progress,
    check_head,
    eval_mode,
    final_hidden,
    nll_from_hidden,
    reset_rotary_state,
    token_nll,
)
from ctxext.evaluate.perplexity import bootstrap_ratio
from ctxext.evaluate.protocol import BOOTSTRAP_RESAMPLES, bucket_edges

__all__ = [
    "KEY_TOKEN_GAIN_NATS",
    "KEY_TOKEN_MAX_NLL",
    "ContextUseResult",
    "context_use",
    "context_use_sweep",
    "context_use_sweep_tokens",
    "key_token_ppl",
    "local_nll",
]

#: LongPPL's key tokens (PKU-ML/LongPPL longppl/longppl.py, commit 1decd2a, line 44):
#: ``(loss_short - loss_full) > alpha and loss_full < -beta`` with the defaults alpha = 2 and
#: beta = -2 (lines 22, 113-114). alpha: a key token's NLL drops by more than this (nats) from
#: the short context to the full one (its long-short difference).
KEY_TOKEN_GAIN_NATS = 2.0
#: -beta: and its full-context NLL is below this (nats): the long context predicts it well
#: (a token the long context helps but still gets wrong is not a key token).
KEY_TOKEN_MAX_NLL = 2.0
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Far-context gain


def short_stride(window: int) -> int:
    """The default stride S of the short pass: W/4, the reference's ratio (``sliding_window``
    1024 to ``trunc_len`` 4096, longppl/longppl.py lines 111-112; ``internal`` 1024 to 4096,
    finetune/finetune.py line 219)."""
    return max(1, window // 4)


def short_chunks(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The short pass's chunks of a sequence of ``length`` positions, as (start, stop): chunk
    [start, stop) is one forward pass and scores the targets start + window .. stop - 1.

    LongPPL's reference (PKU-ML/LongPPL, commit 1decd2a; ``trunc_len`` T = ``window``,
    ``sliding_window`` S = ``stride``), the same in both of its uses:

    - longppl/longppl.py lines 34-42 (key tokens): ``for start_token in range(0, max_len -
      trunc_len, sliding_window)``, the input ``input_ids[:, start_token: start_token +
      trunc_len + sliding_window]`` (the last chunk cut at the end, lines 35-36), scoring its
      last S targets, ``start_token + trunc_len ..``;
    - finetune/finetune.py lines 31-40 (LongCE's weights): the same loop (``internal`` = S),
      every other token's weight 1 (line 28).

    So target p >= T + S is scored in the chunk starting at S * floor((p - T) / S) and reads
    its last T to T + S - 1 positions: never fewer than T (its context is cut to at least the
    short length, not to less). The first chunk (start 0) reads targets T .. T + S - 1 from
    position 0, their whole context, so it is not run: those targets keep their full-context
    NLL (the same number the reference computes twice). Every target p >= T + S is in exactly
    one chunk. (ctxext's earlier windows, W positions stepping back from the end, gave a target
    W - S + 1 to W positions: up to S - 1 fewer than the short length, which counted text
    inside the window as far and inflated the gain and LongCE's weights.)
    """
    return [
        (start, min(start + window + stride, length))
        for start in range(stride, length - window, stride)
    ]


def _accumulate(progress: Progress | None) -> Callable[[int], None]:
    """A tick(n) that adds n tokens and reports the running total to ``progress``."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done)

    return tick


def context_use_sweep_tokens(
    n_docs: int, lengths: Sequence[int], window: int, stride: int, one_pass: bool
) -> int:
    """Tokens ``context_use_sweep`` feeds (its progress total): the full passes (one at the
    longest length, or one per length with cut tokens) and the short chunks, per document."""
    far = _cut_lengths(lengths, window, stride)
    if not far:
        return 0
    full = far[-1] if one_pass else sum(far)
    chunks = short_chunks(far[-1], window, stride)
    return n_docs * (full + sum(stop - start for start, stop in chunks))


def _cut_lengths(lengths: Sequence[int], window: int, stride: int) -> list[int]:
    """The lengths that hold a token whose context the short pass cuts (position >= W + S)."""
    return sorted(n for n in set(lengths) if n > window + stride)


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
    """NLL of tokens 1..L-1 of ``seq`` with LongPPL's short context: target p >= W + S reads its
    last W to W + S - 1 positions (:func:`short_chunks`; W = ``window``, S = ``stride``).

    ``bos``: ``seq[0]`` is the BOS token the full pass starts with, and every chunk starts with
    it in place of its first text token (the same number of positions as the reference's
    chunk; see the module docstring); else a chunk is the plain text, as in the reference.
    ``full`` (the full-context NLL, ``token_nll(seq)``) fills the targets below W + S, whose
    context is not cut; it is computed when not given. The LM head runs over chunks of
    positions (:func:`nll_from_hidden`): no [length x vocab] logits.
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
    with torch.inference_mode(), eval_mode(model):
        for start, stop in short_chunks(len(seq), window, stride):
            text = ids[:, start:stop]
            if bos:  # BOS + the chunk's text after its first token: stop - start positions
                text = torch.cat([ids[:, :1], text[:, 1:]], dim=1)
            hidden = final_hidden(model, text, None)
            # Row r predicts the chunk's position r + 1: targets start + window .. stop - 1.
            rows = hidden[window - 1 : stop - start - 1]
            nll = nll_from_hidden(model, rows, ids[0, start + window : stop], chunk_size)
            out[start + window - 1 : stop - 1] = nll.to(out.device)
            if progress is not None:
                progress(stop - start)
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
    key_ppl: float | None = None
    """Perplexity (full context) over the key tokens; None when there are none."""
    key_fraction: float = 0.0
    """Key tokens / tokens scored."""
    key_tokens: int = 0

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
    the perplexity protocol does); ``bos``: they start with the BOS token, which every short
    chunk keeps (:func:`local_nll`); ``stride`` defaults to :func:`short_stride`.
    """
    if not sequences:
        raise CtxextError("context-use needs at least one document")
    length = len(sequences[0])
    if any(len(s) != length for s in sequences):
        raise ValueError("every sequence must have the same length")
    stride = stride or short_stride(window)
    fulls, locals_ = [], []
    tick = _accumulate(progress)

    check_head(model, sequences[0])
    for seq in sequences:
        reset_rotary_state(model)  # a length-dependent rope starts from its initial state
        full = token_nll(model, torch.tensor([list(seq)]), chunk_size=chunk_size)
        tick(length)
        fulls.append(full.double())
        reset_rotary_state(model)  # and the chunks start from the initial frequencies
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
    far = max(0, length - window - stride)  # the cut positions, window + stride .. L-1
    total_mean, total_low, total_high = _gain_interval(
        diff.sum(axis=1), np.full(len(fulls), far), seed, BOOTSTRAP_RESAMPLES
    )
    key_ppl, key_tokens = key_token_ppl(fulls, locals_)
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
        key_ppl=key_ppl,
        key_fraction=key_tokens / (len(fulls) * (length - 1)),
        key_tokens=key_tokens,
    )


def key_token_ppl(
    fulls: Sequence[torch.Tensor],
    locals_: Sequence[torch.Tensor],
    *,
    min_gain: float = KEY_TOKEN_GAIN_NATS,
    max_nll: float = KEY_TOKEN_MAX_NLL,
) -> tuple[float | None, int]:
    """LongPPL (Fang et al. 2024), the model its own evaluator: exp of the mean full-context NLL
    over the key tokens, and how many there are (None and 0 when none).

    A key token, as longppl/longppl.py line 44 (commit 1decd2a) selects it: its NLL drops by
    more than ``min_gain`` (alpha) nats from the short context to the full one, *and* its
    full-context NLL is below ``max_nll`` (-beta): both strict. LongPPL is then exp of the mean
    full-context NLL over them (lines 165-173).
    """
    nll, count = 0.0, 0
    for full, local in zip(fulls, locals_, strict=True):
        full, local = full.double(), local.double()
        key = ((local - full) > min_gain) & (full < max_nll)
        nll += float(full[key].sum())
        count += int(key.sum())
    return (math.exp(nll / count) if count else None), count


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
    """Far-context gain at every length with a cut token (longer than ``window`` + ``stride``),
    on the same documents.

    ``sequences`` are the documents' first max(lengths) tokens (``bos``: BOS first); at length L
    each is cut to its first L. The short chunks start at multiples of the stride from position
    0 (:func:`short_chunks`), so what position p reads in the short pass does not depend on the
    length: it is computed once per document. The full-context NLL at L is a prefix of the one
    at the longest length when the rope is static (``one_pass``); a length-dependent rope
    (dynamic NTK) gets a fresh pass per length, after its rotary state is reset.
    """
    stride = stride or short_stride(window)
    todo = _cut_lengths(lengths, window, stride)
    if not todo:
        return {}
    longest = todo[-1]
    seqs = [list(s[:longest]) for s in sequences]
    if any(len(s) < longest for s in seqs):
        raise ValueError("every sequence must hold the longest length")
    tick = _accumulate(progress)
    check_head(model, seqs[0])

    fulls: dict[int, list[torch.Tensor]] = {n: [] for n in todo}
    locals_: list[torch.Tensor] = []
    # Only targets from window + stride on have text to cut (index window + stride - 1); the
    # others keep each length's own full-context NLL.
    cut = window + stride - 1
    for seq in seqs:
        for n in [longest] if one_pass else todo:
            reset_rotary_state(model)
            full = token_nll(model, torch.tensor([seq[:n]]), chunk_size=chunk_size)
            tick(n)
            if one_pass:
                for m in todo:
                    fulls[m].append(full[: m - 1])
            else:
                fulls[n].append(full)
        reset_rotary_state(model)  # the chunks start from the initial frequencies
        local = local_nll(model, seq, window, stride, bos=bos, full=full, progress=tick)
        locals_.append(local[cut:])
    results = {}
    for n in todo:
        fs = [f.double() for f in fulls[n]]
        ls = [
            torch.cat([f[:cut], tail[: n - 1 - cut].double()])
            for f, tail in zip(fs, locals_, strict=True)
        ]
        results[n] = _gain_result(fs, ls, n, window, stride, seed, bos)
    return results


def context_use_protocol(window: int, stride: int, seed: int, bos: bool) -> dict[str, Any]:
    reads = f"its last {window} to {window + stride - 1} positions"
    if bos:
        start = "BOS in place of its first text token, as the full pass starts"
    else:
        start = "plain text, no BOS token"
    return {
        "name": "context-use",
        "description": (
            f"far-context gain: NLL with the context cut to a short one of at least {window} "
            "positions minus NLL with the full context, in bits per token (short - full) / "
            f"ln 2; the short context is LongPPL's (Fang et al. 2024): fresh chunks of "
            f"{window + stride} positions starting every {stride} positions ({start}), so a "
            f"scored token reads {reads}; not an attention mask; tokens at positions "
            f"< {window + stride} have nothing cut (gain 0)"
        ),
        "local_window": window,
        "local_stride": stride,
        "local_start": "BOS (as the full pass)" if bos else "text (no BOS token)",
        "gain_bits": "token-weighted over the tokens whose context is cut",
        "key_token_nats": KEY_TOKEN_GAIN_NATS,
        "key_token_max_nll": KEY_TOKEN_MAX_NLL,
        "key_tokens": (
            "LongPPL (Fang et al. 2024; PKU-ML/LongPPL longppl.py): key tokens are those whose "
            f"NLL drops by more than {KEY_TOKEN_GAIN_NATS:g} nats from the short context to "
            f"the full one and whose full-context NLL is below {KEY_TOKEN_MAX_NLL:g} nats (the "
            "model is its own evaluator); key_ppl is exp(mean full-context NLL) over them, "
            "key_fraction their share of all scored tokens"
        ),
        "interval": f"95% percentile bootstrap over documents, {BOOTSTRAP_RESAMPLES} "
        f"resamples, seed {seed} (+ bucket index per bucket)",
    }
