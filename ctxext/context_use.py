"""Does a model *use* its extended context? Far-context gain, in-domain retrieval, effective length.

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
* **Retrieval** (``evaluate_retrieval``): a key hidden at a depth of the context, asked for at the
  end, scored teacher-forced on the key's tokens (correct iff every answer token is the argmax).
  The key/value forms are ``ctxext.needles`` templates (code and prose, several name shapes,
  assignment syntaxes and query forms), split into forms ctxext trains on and forms it never
  does; the default scores the held-out ones hidden in real held-out documents, so a model that
  memorised one form does not pass. ``text`` is the natural-language passkey of Mohtashami &
  Jaggi in its own filler.
* **Effective context length** (``effective_length``): the longest evaluated length up to which
  (at it and at every shorter evaluated length) retrieval is >= 90% at every depth and the
  far-context gain of the last bucket is positive (its bootstrap interval lies above 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import token_nll
from ctxext.evaluate.passkey import build_passkey_prompt, score_grid
from ctxext.evaluate.perplexity import bootstrap_ratio
from ctxext.evaluate.protocol import BOOTSTRAP_RESAMPLES, bucket_edges
from ctxext.needles import (
    TEMPLATES,
    PasskeyPrompt,
    build_prompt,
    random_key,
    random_name,
    resolve_templates,
)

__all__ = [
    "KEY_TOKEN_NATS",
    "RETRIEVAL_THRESHOLD",
    "ContextUseResult",
    "RetrievalResult",
    "context_use",
    "context_use_sweep",
    "effective_length",
    "evaluate_retrieval",
    "key_token_ppl",
    "local_nll",
    "planned_sweep_tokens",
]

Progress = Callable[[int], None]
#: Retrieval accuracy at every depth needed for a length to count as read.
RETRIEVAL_THRESHOLD = 0.9
#: A key token's NLL drops by more than this (nats) from the local window to the full context
#: (the long-short difference threshold of LongPPL, Fang et al. 2024).
KEY_TOKEN_NATS = 2.0
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


def _accumulate(progress: Progress | None) -> Callable[[int], None]:
    """A tick(n) that adds n tokens and reports the running total to ``progress``."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done)

    return tick


def planned_sweep_tokens(
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
    from ctxext.evaluate.loss import _eval_mode, _final_hidden, _nll_from_hidden

    ids = torch.tensor([list(seq)])
    if full is None:
        full = token_nll(model, ids, chunk_size=chunk_size)
    out = full.clone()
    start = ids[:, :1] if bos else ids[:, :0]
    with torch.inference_mode(), _eval_mode(model):
        for last, n in _local_windows(len(seq), window, stride):
            # Input: the start (BOS) and the tokens before `last`, exactly `window` in all
            # (never longer, so a length-dependent rope sees a window-sized input); its last n
            # rows predict the targets last-n+1 .. last.
            text = ids[:, last - window + start.shape[1] : last]
            hidden = _final_hidden(model, torch.cat([start, text], dim=1), None)
            nll = _nll_from_hidden(model, hidden[-n:], ids[0, last - n + 1 : last + 1], chunk_size)
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
    the perplexity protocol does); ``bos``: they start with the BOS token, which every local
    window keeps (:func:`local_nll`); ``stride`` defaults to window // 4.
    """
    if not sequences:
        raise CtxextError("context-use needs at least one document")
    length = len(sequences[0])
    if any(len(s) != length for s in sequences):
        raise ValueError("every sequence must have the same length")
    stride = stride or max(1, window // 4)
    fulls, locals_ = [], []
    tick = _accumulate(progress)

    from ctxext.evaluate.loss import _check_head, reset_rotary_state

    _check_head(model, sequences[0])
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
    fulls: Sequence[torch.Tensor], locals_: Sequence[torch.Tensor]
) -> tuple[float | None, int]:
    """LongPPL-style perplexity: exp of the mean full-context NLL over the key tokens, those
    whose NLL drops by more than KEY_TOKEN_NATS from the local window to the full context;
    and how many there are (None and 0 when none)."""
    nll, count = 0.0, 0
    for full, local in zip(fulls, locals_, strict=True):
        key = (local.double() - full.double()) > KEY_TOKEN_NATS
        nll += float(full.double()[key].sum())
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
    """Far-context gain at every length longer than ``window``, on the same documents.

    ``sequences`` are the documents' first max(lengths) tokens (``bos``: BOS first); at length L
    each is cut to its first L. The local NLL of position p reads only the BOS and tokens
    p-W+1..p-1, which are the same at every length, so it is computed once per document. The full-context NLL at L is a prefix of the
    one at the longest length when the rope is static (``one_pass``); a length-dependent rope
    (dynamic NTK) gets a fresh pass per length, after its rotary state is reset.
    """
    from ctxext.evaluate.loss import _check_head, reset_rotary_state

    stride = stride or max(1, window // 4)
    todo = sorted(n for n in set(lengths) if n > window)
    if not todo:
        return {}
    longest = todo[-1]
    seqs = [list(s[:longest]) for s in sequences]
    if any(len(s) < longest for s in seqs):
        raise ValueError("every sequence must hold the longest length")
    tick = _accumulate(progress)
    _check_head(model, seqs[0])

    fulls: dict[int, list[torch.Tensor]] = {n: [] for n in todo}
    locals_: list[torch.Tensor] = []
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
        "key_token_nats": KEY_TOKEN_NATS,
        "key_tokens": (
            f"LongPPL-style (Fang et al. 2024): key tokens are those whose NLL drops by more "
            f"than {KEY_TOKEN_NATS:g} nats from the local window to the full context (the "
            "model is its own judge; the paper's second condition on the full-context "
            "probability is not applied); key_ppl is exp(mean full-context NLL) over them, "
            "key_fraction their share of all scored tokens"
        ),
        "interval": f"95% percentile bootstrap over documents, {BOOTSTRAP_RESAMPLES} "
        f"resamples, seed {seed} (+ bucket index per bucket)",
    }


# ---------------------------------------------------------------------------------------------
# Retrieval: text (passkey) and code templates


@dataclass
class RetrievalResult:
    """Accuracy per length x depth (``accuracy[i][j]``: lengths[i] at depths[j])."""

    template: str
    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]
    correct: list[list[int]]
    templates: list[str] = field(default_factory=list)
    """The templates pooled in each cell (``text`` for the passkey)."""
    by_template: dict[str, list[list[float]]] = field(default_factory=dict)
    """Accuracy per template, length and depth."""
    protocol: dict[str, Any] = field(default_factory=dict)
    answer_nll: list[list[float]] = field(default_factory=list)
    """Mean over trials of the answer tokens' summed NLL (nats), per length x depth."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_by_length"] = {
            str(n): float(np.mean(row)) for n, row in zip(self.lengths, self.accuracy, strict=True)
        }
        return d

    def retrieves_at(self, length: int, threshold: float = RETRIEVAL_THRESHOLD) -> bool:
        row = self.accuracy[self.lengths.index(length)]
        return all(a >= threshold for a in row)


def _code_filler(doc_ids: Sequence[Sequence[int]], need: int, rng: np.random.Generator):
    """A random document with at least ``need`` tokens (the longest one otherwise)."""
    long_enough = [i for i, ids in enumerate(doc_ids) if len(ids) >= need]
    if not long_enough:
        return max(doc_ids, key=len)
    return doc_ids[long_enough[int(rng.integers(0, len(long_enough)))]]


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    *,
    template: str,
    doc_token_ids: Sequence[Sequence[int]] | None = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> RetrievalResult:
    """Retrieval accuracy for every length x depth: ``trials`` random 5-digit keys per template
    (the rotary state reset before every length, as every task does).

    ``template``: ``text`` (the natural-language passkey in its own filler), or a selection of
    ``ctxext.needles`` templates hidden in ``doc_token_ids`` (``heldout``, ``train``, ``all``
    or comma-separated names). A cell's accuracy and answer NLL pool every selected template's
    trials; the per-template accuracies are kept in ``by_template``.
    """
    forms = None if template == "text" else resolve_templates(template)
    if forms is not None and not doc_token_ids:
        raise CtxextError("the retrieval templates need documents to hide the key in")
    names = ["text"] if forms is None else [t.name for t in forms]
    rng = np.random.default_rng(seed)

    def prompt_for(length: int, depth: float, label: str) -> PasskeyPrompt:
        key = random_key(rng)
        if forms is None:
            return build_passkey_prompt(tokenizer, length, depth, key)
        t = TEMPLATES[label]
        name = random_name(rng, t.shape)
        filler = _code_filler(doc_token_ids, length, rng)
        return build_prompt(tokenizer, filler, length, depth, key, name, t)

    scores = score_grid(model, lengths, depths, trials, prompt_for, names, progress)
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    pooled = [[0] * len(depths) for _ in lengths]
    nll = [[0.0] * len(depths) for _ in lengths]
    for i, j in cells:
        pooled[i][j] = sum(scores[n][0][i][j] for n in names)
        nll[i][j] = sum(scores[n][1][i][j] for n in names) / len(names)
    per = trials * len(names)
    return RetrievalResult(
        template=template,
        lengths=list(lengths),
        depths=list(depths),
        trials=per,
        accuracy=[[c / per for c in row] for row in pooled],
        correct=pooled,
        templates=names,
        by_template={n: [[c / trials for c in row] for row in scores[n][0]] for n in names},
        protocol=retrieval_protocol(template, names, seed),
        answer_nll=nll,
    )


def retrieval_protocol(template: str, names: Sequence[str], seed: int) -> dict[str, Any]:
    if template == "text":
        prompt = (
            "BOS + task + filler + 'The pass key is KEY...' at the depth + filler + question "
            "+ KEY (Mohtashami & Jaggi)"
        )
    else:
        forms = [TEMPLATES[n] for n in names]
        prompt = (
            "BOS + held-out documents cut at line boundaries + '\\nNEEDLE\\n' at the depth + "
            "documents + '\\nQUESTION KEY', per template: "
            + "; ".join(f"{t.name} ({t.split}): {t.needle!r} ... {t.question!r}" for t in forms)
        )
    return {
        "name": f"retrieval-{template}",
        "template": template,
        "templates": list(names),
        "split": sorted({TEMPLATES[n].split for n in names}) if template != "text" else [],
        "prompt": prompt + "; exactly `length` tokens including the answer",
        "depth": "fraction of the filler tokens placed before the needle",
        "scoring": "teacher-forced greedy: correct iff the argmax at every answer position is "
        "the answer's token; a cell pools every template's trials; answer_nll: mean over a "
        "cell's prompts of the answer tokens' summed NLL (nats)",
        "keys": f"uniform 5-digit integers (and random names of each template's shape), numpy "
        f"default_rng(seed={seed})",
    }


# ---------------------------------------------------------------------------------------------
# Effective context length


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
