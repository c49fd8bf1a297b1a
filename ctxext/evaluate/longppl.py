"""LongPPL (Fang et al. 2024, "What is wrong with perplexity for long-context language
modeling?"), the model its own evaluator, as the reference computes it (PKU-ML/LongPPL, commit
1decd2a, longppl/longppl.py), and the reference's short pass, which LongCE's weights also read
(:mod:`ctxext.finetune.loss`).

Every token's NLL is measured twice: with its full context (one forward pass of L positions,
BOS first when the tokenizer has one) and with a short context (:func:`short_nll`: chunks of
W + S positions starting every S positions, so a token at position p >= W + S reads its last W
to W + S - 1 positions; an earlier token reads its whole context, nothing is cut). A *key
token* is one whose NLL drops by more than KEY_TOKEN_GAIN_NATS from the short context to the
full one *and* whose full-context NLL is below KEY_TOKEN_MAX_NLL (the long context helps it,
and predicts it well). LongPPL is exp of the mean full-context NLL over the key tokens.

This is not the far-context gain's short pass (:func:`ctxext.evaluate.context_use.local_nll`:
fresh windows of at most W positions stepping back from the end, so a model is never fed more
than its trained length there); here the chunks hold W + S positions, as in the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import (
    Progress,
    accumulate,
    eval_mode,
    final_hidden,
    full_nll_by_length,
    nll_from_hidden,
    reset_rotary_state,
    sweep_sequences,
    token_nll,
)
from ctxext.evaluate.short_pass import short_chunks, short_stride

__all__ = [
    "KEY_TOKEN_GAIN_NATS",
    "KEY_TOKEN_MAX_NLL",
    "LongPPLResult",
    "key_token_ppl",
    "longppl_protocol",
    "longppl_sweep",
    "longppl_sweep_tokens",
    "short_chunks",
    "short_nll",
    "short_stride",
]

#: LongPPL's key tokens (longppl/longppl.py line 44):
#: ``(loss_short - loss_full) > alpha and loss_full < -beta`` with the defaults alpha = 2 and
#: beta = -2 (lines 22, 113-114). alpha: a key token's NLL drops by more than this (nats) from
#: the short context to the full one (its long-short difference).
KEY_TOKEN_GAIN_NATS = 2.0
#: -beta: and its full-context NLL is below this (nats): the long context predicts it well
#: (a token the long context helps but still gets wrong is not a key token).
KEY_TOKEN_MAX_NLL = 2.0


def short_nll(
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
    """NLL of tokens 1..L-1 of ``seq`` with the reference's short context: target p >= W + S
    reads its last W to W + S - 1 positions (:func:`short_chunks`; W = ``window``, S =
    ``stride``).

    ``bos``: ``seq[0]`` is the BOS token the full pass starts with, and every chunk starts with
    it in place of its first text token (the same number of positions as the reference's
    chunk, whose start is mid-text: so both passes read the same attention sink and only the
    cut text differs); else a chunk is the plain text, as in the reference. ``full`` (the
    full-context NLL, ``token_nll(seq)``) fills the targets below W + S, whose context is not
    cut; it is computed when not given. The LM head runs over chunks of positions
    (:func:`~ctxext.evaluate.loss.nll_from_hidden`): no [length x vocab] logits.
    """
    if window < 1 or not 1 <= stride <= window:
        raise CtxextError(
            f"the short window ({window}) must be >= 1 and its stride ({stride}) between 1 and "
            "the window"
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


def key_token_ppl(
    fulls: Sequence[torch.Tensor],
    shorts: Sequence[torch.Tensor],
    *,
    min_gain: float = KEY_TOKEN_GAIN_NATS,
    max_nll: float = KEY_TOKEN_MAX_NLL,
) -> tuple[float | None, int]:
    """LongPPL: exp of the mean full-context NLL over the key tokens, and how many there are
    (None and 0 when none).

    A key token, as longppl/longppl.py line 44 selects it: its NLL drops by more than
    ``min_gain`` (alpha) nats from the short context to the full one, *and* its full-context
    NLL is below ``max_nll`` (-beta): both strict. LongPPL is then exp of the mean
    full-context NLL over them (lines 165-173).
    """
    nll, count = 0.0, 0
    for full, short in zip(fulls, shorts, strict=True):
        full, short = full.double(), short.double()
        key = ((short - full) > min_gain) & (full < max_nll)
        nll += float(full[key].sum())
        count += int(key.sum())
    return (math.exp(nll / count) if count else None), count


@dataclass
class LongPPLResult:
    """LongPPL at one length: the key tokens' perplexity with the full context."""

    length: int
    window: int
    """W: the short context (the reference's ``trunc_len``)."""
    stride: int
    """S: the chunks' stride (the reference's ``sliding_window``)."""
    n_docs: int
    key_ppl: float | None
    """exp(mean full-context NLL) over the key tokens; None when there are none."""
    key_tokens: int
    key_fraction: float
    """Key tokens / all scored tokens (positions 1..L-1 of every document)."""
    n_tokens: int
    """Tokens scored: documents x (L - 1)."""
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cut_lengths(lengths: Sequence[int], window: int, stride: int) -> list[int]:
    """The lengths that hold a token whose context the short pass cuts (position >= W + S)."""
    return sorted(n for n in set(lengths) if n > window + stride)


def longppl_sweep_tokens(
    n_docs: int, lengths: Sequence[int], window: int, stride: int, one_pass: bool
) -> int:
    """Tokens :func:`longppl_sweep` feeds (its progress total): per document, the full passes
    and the short chunks (once at the longest length, or once per length)."""
    todo = _cut_lengths(lengths, window, stride)
    per_length = [n + sum(b - a for a, b in short_chunks(n, window, stride)) for n in todo]
    return n_docs * (per_length[-1] if one_pass and todo else sum(per_length))


def longppl_sweep(
    model: Any,
    sequences: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    window: int,
    bos: bool,
    stride: int | None = None,
    one_pass: bool = True,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> dict[int, LongPPLResult]:
    """LongPPL at every length with a cut token (longer than ``window`` + ``stride``), on the
    same documents.

    ``sequences`` are the documents' first max(lengths) tokens (``bos``: BOS first); at length L
    each is cut to its first L. When the rope is static (``one_pass``) both passes run once at
    the longest length: the full-context NLL at L is a prefix of the longest's, and the short
    chunks start at multiples of S from position 0, so what a target reads in them does not
    depend on L. A length-dependent rope (dynamic NTK) gets both passes afresh per length,
    each after a rotary reset (its frequencies depend on the input's length).
    """
    stride = stride or short_stride(window)
    todo = _cut_lengths(lengths, window, stride)
    if not todo:
        return {}
    longest = todo[-1]
    tick = accumulate(progress)
    seqs = sweep_sequences(model, sequences, longest)

    fulls: dict[int, list[torch.Tensor]] = {n: [] for n in todo}
    shorts: dict[int, list[torch.Tensor]] = {n: [] for n in todo}
    for seq in seqs:
        by_length = full_nll_by_length(
            model, seq, todo, one_pass=one_pass, chunk_size=chunk_size, tick=tick
        )
        for n in [longest] if one_pass else todo:
            reset_rotary_state(model)
            short = short_nll(
                model, seq[:n], window, stride, bos=bos, full=by_length[n], progress=tick
            )
            for m in todo if one_pass else [n]:
                fulls[m].append(by_length[m])
                shorts[m].append(short[: m - 1])
    results = {}
    for n in todo:
        key_ppl, key_tokens = key_token_ppl(fulls[n], shorts[n])
        scored = len(seqs) * (n - 1)
        results[n] = LongPPLResult(
            length=n,
            window=window,
            stride=stride,
            n_docs=len(seqs),
            key_ppl=key_ppl,
            key_tokens=key_tokens,
            key_fraction=key_tokens / scored,
            n_tokens=scored,
            protocol=longppl_protocol(window, stride, bos),
        )
    return results


def longppl_protocol(window: int, stride: int, bos: bool) -> dict[str, Any]:
    start = "BOS in place of its first text token, as the full pass starts" if bos else "text"
    return {
        "name": "longppl",
        "description": (
            "LongPPL (Fang et al. 2024; PKU-ML/LongPPL longppl/longppl.py at 1decd2a), the "
            "model its own evaluator: key tokens are those whose NLL drops by more than "
            f"{KEY_TOKEN_GAIN_NATS:g} nats from the short context to the full one and whose "
            f"full-context NLL is below {KEY_TOKEN_MAX_NLL:g} nats; the short context is the "
            f"reference's: chunks of {window + stride} positions starting every {stride} "
            f"positions ({start}), so a token at position >= {window + stride} reads its last "
            f"{window} to {window + stride - 1} positions and an earlier one is not cut; "
            "key_ppl = exp(mean full-context NLL over the key tokens), key_fraction = key "
            "tokens / all scored tokens"
        ),
        "short_window": window,
        "short_stride": stride,
        "short_start": "BOS (as the full pass)" if bos else "text (no BOS token)",
        "key_token_nats": KEY_TOKEN_GAIN_NATS,
        "key_token_max_nll": KEY_TOKEN_MAX_NLL,
    }
