"""Exact, memory-lean perplexity and passkey retrieval.

Why not ``model(input_ids, labels=input_ids)``: transformers materialises the logits of every
position, ``[L, vocab]``, and upcasts them to fp32 before the loss (32k tokens x 152k vocab is
18.5 GiB, plus as much again inside ``cross_entropy``). Here the decoder runs once to its final
hidden states (``[L, hidden]``, small), and the LM head + loss run over chunks of positions, so
at most ``[chunk, vocab]`` logits exist at any time. The operations are the ones transformers
runs (head in the model's dtype, the same logit transforms, then fp32 ``cross_entropy``), so the
numbers equal the model's own loss; sums are accumulated in float64.

Perplexity protocols (their numbers do not compare with each other; every result carries a
``protocol`` dict saying which one produced it):

* ``truncate`` (default; YaRN's ``--truncate``): at length L, every document with at least L
  tokens *after* BOS is prepended (when the tokenizer has a BOS) is scored on its first L tokens:
  the sequence is BOS + the first L-1 document tokens, and the L-1 tokens after position 0 are
  scored. Without a BOS the sequence is the first L document tokens, again L-1 scored.
* ``sliding`` with stride S (the Hugging Face guide "Perplexity of fixed-length models"): over
  each whole eligible document (same eligibility rule; BOS only at the document's start), windows
  of exactly L tokens ending at L, L+S, L+2S, ... and a last one ending at the document's end;
  each window scores only the tokens no earlier window scored, so with S < L every token after
  position 0 is scored exactly once, each with at least L-S tokens of context. With S == L the
  windows are disjoint and each window's first token is context only (not scored).

Both are token-weighted: PPL = exp(total NLL / total scored tokens). ``num_docs`` keeps a seeded
random sample of the eligible documents (kept in their original order), so the same seed and data
give the same documents. The 95% interval is a percentile bootstrap over documents (resample
documents with replacement, recompute the token-weighted PPL; 1000 resamples, seeded).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctxext.errors import CtxextError

__all__ = [
    "DEFAULT_DEPTHS",
    "PasskeyPrompt",
    "PasskeyResult",
    "PerplexityResult",
    "bucket_edges",
    "build_passkey_prompt",
    "default_chunk_size",
    "evaluate_passkey",
    "evaluate_perplexity",
    "planned_tokens",
    "token_nll",
]

Progress = Callable[[int], None]

#: Budget for one chunk of fp32 logits plus the same again inside cross_entropy (log-softmax).
LOGITS_BUDGET_BYTES = 256 * 2**20
#: The first position bucket is [0, 256); each next one doubles: [256, 512), [512, 1024), ...
FIRST_BUCKET_END = 256
BOOTSTRAP_RESAMPLES = 1000
#: The chunked loss must agree with the model's own loss this closely on the sanity check.
_HEAD_CHECK_RTOL = 1e-3
_HEAD_CHECK_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# Chunked loss through the LM head


def default_chunk_size(vocab_size: int) -> int:
    """Positions per head chunk so that the chunk's fp32 logits (x2) stay within the budget."""
    return max(16, LOGITS_BUDGET_BYTES // (vocab_size * 4 * 2))


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [n, H] -> fp32 logits [n, vocab], exactly as the model's forward computes them."""
    lm_head = model.get_output_embeddings()
    if lm_head is None:
        raise CtxextError(
            f"{type(model).__name__} has no output embeddings (LM head); pass a causal LM"
        )
    config = _text_config(model)
    # The transforms some architectures apply after the head, in the order their forward does,
    # in the model's dtype (transformers upcasts only inside the loss).
    scale = getattr(model, "logit_scale", None) or getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = lm_head(hidden)
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    return head


def _decoder(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise CtxextError(f"cannot find the decoder of {type(model).__name__}; pass a causal LM")
    return decoder


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _final_hidden(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """Final (normed) hidden states [L, H] of one sequence; no KV cache is built."""
    device = _device(model)
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids.to(device)
        # Without a cache and without a mask, transformers reads any jump in position_ids as
        # the start of another packed sequence and blocks attention across it; an explicit
        # all-ones mask says "one sequence" (as model(...) does through its KV cache).
        kwargs["attention_mask"] = torch.ones_like(input_ids, device=device)
    out = _decoder(model)(input_ids=input_ids.to(device), use_cache=False, **kwargs)
    return out.last_hidden_state[0]


def _nll_from_hidden(
    model: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """Per-token NLL (fp32) of ``targets`` given ``hidden`` (row i predicts targets[i])."""
    head = _head(model)
    chunk = chunk_size or default_chunk_size(_text_config(model).vocab_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    targets = targets.to(hidden.device)
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk):
        stop = min(start + chunk, targets.shape[0])
        out[start:stop] = F.cross_entropy(
            head(hidden[start:stop]), targets[start:stop], reduction="none"
        )
    return out


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while evaluating; the caller's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def token_nll(
    model: Any,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """NLL (fp32, on the model's device) of tokens 1..L-1 of ``input_ids`` [1, L]; length L-1.

    Equals the per-token terms of ``model(input_ids, labels=input_ids).loss`` without ever
    holding more than ``chunk_size`` positions of logits (default: ``default_chunk_size``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must have shape [1, L] with L >= 2, got {tuple(input_ids.shape)}"
        )
    with _eval_mode(model):
        hidden = _final_hidden(model, input_ids, position_ids)
        return _nll_from_hidden(model, hidden[:-1], input_ids[0, 1:], chunk_size)


def _check_head(model: Any, ids: list[int]) -> None:
    """Refuse models whose forward transforms logits in a way ``_head`` does not replicate."""
    x = torch.tensor([ids[:_HEAD_CHECK_TOKENS]])
    with torch.inference_mode(), _eval_mode(model):
        ours = token_nll(model, x).double().mean().item()
        theirs = model(input_ids=x.to(_device(model)), labels=x.to(_device(model))).loss.item()
    if not math.isclose(ours, theirs, rel_tol=_HEAD_CHECK_RTOL, abs_tol=1e-6):
        raise CtxextError(
            f"the chunked loss of {type(model).__name__} ({ours:.6f}) differs from its own loss "
            f"({theirs:.6f}): its output head does something ctxext does not replicate; "
            "report the model type"
        )


# ---------------------------------------------------------------------------------------------
# Perplexity


def bucket_edges(length: int) -> list[int]:
    """Edges of the position buckets [0,256), [256,512), [512,1024), ..., the last clipped to L."""
    edges = [0, FIRST_BUCKET_END]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges = [e for e in edges if e < length] + [length]
    return edges


@dataclass(frozen=True)
class _Window:
    """One forward pass: seq[begin:end], scoring targets at absolute positions first..end-1."""

    begin: int
    end: int
    first: int


def _windows(n: int, length: int, stride: int | None) -> list[_Window]:
    if stride is None:  # truncate: the first L tokens only
        return [_Window(0, length, 1)]
    ends = list(range(length, n + 1, stride))
    if ends[-1] != n:
        ends.append(n)  # a last window of full length L, ending at the document's end
    windows, scored_to = [], 1  # position 0 has nothing before it
    for end in ends:
        begin = end - length
        # A target needs its predecessor in the window, hence begin + 1.
        first = max(scored_to, begin + 1)
        windows.append(_Window(begin, end, first))
        scored_to = end
    return windows


@dataclass(frozen=True)
class _Planned:
    doc_index: int
    seq: list[int]
    windows: list[_Window]


def _plan(
    doc_token_ids: Sequence[Sequence[int]],
    length: int,
    bos_token_id: int | None,
    stride: int | None,
    num_docs: int | None,
    seed: int,
) -> list[_Planned]:
    """Which documents are scored, as which token sequence, through which windows."""
    if length < 2:
        raise CtxextError(f"length {length} is too short; use lengths of at least 2 tokens")
    if stride is not None and not 1 <= stride <= length:
        raise CtxextError(f"stride {stride} must be between 1 and the length {length}")
    if num_docs is not None and num_docs < 1:
        raise CtxextError(f"--num-docs must be at least 1, got {num_docs}")
    prefix = [] if bos_token_id is None else [bos_token_id]
    eligible = [i for i, ids in enumerate(doc_token_ids) if len(prefix) + len(ids) >= length]
    if not eligible:
        longest = len(prefix) + max((len(ids) for ids in doc_token_ids), default=0)
        raise CtxextError(
            f"no document has at least {length} tokens (the longest has {longest} tokens"
            f"{', BOS included' if prefix else ''}); lower --lengths or use longer data"
        )
    if num_docs is not None and num_docs < len(eligible):
        rng = np.random.default_rng(seed)
        eligible = sorted(rng.choice(eligible, size=num_docs, replace=False).tolist())
    plans = []
    for i in eligible:
        ids = doc_token_ids[i] if stride is not None else doc_token_ids[i][:length]
        seq = (prefix + list(ids))[: None if stride is not None else length]
        plans.append(_Planned(i, seq, _windows(len(seq), length, stride)))
    return plans


def planned_tokens(
    doc_token_ids: Sequence[Sequence[int]],
    length: int,
    *,
    bos_token_id: int | None,
    stride: int | None = None,
    num_docs: int | None = None,
    seed: int = 0,
) -> int:
    """Tokens ``evaluate_perplexity`` will feed through the model (the progress total)."""
    plans = _plan(doc_token_ids, length, bos_token_id, stride, num_docs, seed)
    return sum(w.end - w.begin for p in plans for w in p.windows)


@dataclass
class PerplexityResult:
    """Token-weighted perplexity at one length, with its interval and per-position buckets."""

    length: int
    ppl: float
    nll_sum: float
    n_tokens: int
    n_docs: int
    ci_low: float
    ci_high: float
    buckets: list[dict[str, Any]] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ppl(nll_sum: float, n_tokens: int) -> float:
    # exp overflows to inf for a hopeless model; that is an honest answer, not an error.
    try:
        return math.exp(nll_sum / n_tokens)
    except OverflowError:
        return math.inf


def _bootstrap(
    doc_nll: np.ndarray, doc_tokens: np.ndarray, seed: int, resamples: int
) -> tuple[float, float]:
    """Percentile 95% interval of the token-weighted PPL, resampling documents."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(doc_nll), size=(resamples, len(doc_nll)))
    mean_nll = doc_nll[idx].sum(axis=1) / doc_tokens[idx].sum(axis=1)
    low, high = np.percentile(mean_nll, [2.5, 97.5])
    # Percentiles of the mean NLL map to percentiles of PPL (exp is monotonic).
    return _ppl(float(low), 1), _ppl(float(high), 1)


def _protocol(
    length: int, bos_token_id: int | None, stride: int | None, num_docs: int | None, seed: int
) -> dict[str, Any]:
    bos = bos_token_id is not None
    if stride is None:
        desc = (
            f"first {length} tokens of each document with at least {length} tokens"
            + (f" (BOS + first {length - 1} document tokens)" if bos else "")
            + f"; {length - 1} tokens scored per document"
        )
    else:
        desc = (
            f"sliding windows of {length} tokens, stride {stride}, over each whole document with "
            f"at least {length} tokens{' (BOS at the start only)' if bos else ''}; each window "
            "scores only tokens not scored before"
        )
    return {
        "name": "truncate" if stride is None else "sliding",
        "description": desc,
        "stride": stride,
        "bos_prepended": bos,
        "bos_token_id": bos_token_id,
        "num_docs_cap": num_docs,
        "doc_selection": "all eligible" if num_docs is None else f"seeded sample (seed {seed})",
        "weighting": "token-weighted: exp(total NLL / total scored tokens)",
        "interval": f"95% percentile bootstrap over documents, {BOOTSTRAP_RESAMPLES} resamples, "
        f"seed {seed}",
        "buckets": "by position of the predicted token within the model input",
    }


@torch.inference_mode()
def evaluate_perplexity(
    model: Any,
    doc_token_ids: list[list[int]],
    length: int,
    *,
    bos_token_id: int | None,
    stride: int | None = None,
    num_docs: int | None = None,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity at ``length`` (see the module docstring for the protocols).

    ``progress(tokens_done)`` is called after every forward pass with the cumulative number of
    tokens fed so far; the total is ``planned_tokens(...)`` with the same arguments.
    """
    plans = _plan(doc_token_ids, length, bos_token_id, stride, num_docs, seed)
    _check_head(model, plans[0].seq)
    edges = bucket_edges(length)
    bucket_nll = np.zeros(len(edges) - 1)
    bucket_n = np.zeros(len(edges) - 1, dtype=np.int64)
    doc_nll = np.zeros(len(plans))
    doc_n = np.zeros(len(plans), dtype=np.int64)
    done = 0
    with _eval_mode(model):
        for d, plan in enumerate(plans):
            for w in plan.windows:
                nll = token_nll(
                    model, torch.tensor([plan.seq[w.begin : w.end]]), chunk_size=chunk_size
                )
                # nll[j] scores window position j+1; keep positions first-begin .. end-begin-1.
                nll = nll[w.first - w.begin - 1 :].double().cpu().numpy()
                positions = np.arange(w.first - w.begin, w.end - w.begin)
                doc_nll[d] += nll.sum()
                doc_n[d] += len(nll)
                which = np.searchsorted(edges, positions, side="right") - 1
                np.add.at(bucket_nll, which, nll)
                np.add.at(bucket_n, which, 1)
                done += w.end - w.begin
                if progress is not None:
                    progress(done)
    nll_sum, n_tokens = float(doc_nll.sum()), int(doc_n.sum())
    ci_low, ci_high = _bootstrap(doc_nll, doc_n, seed, BOOTSTRAP_RESAMPLES)
    buckets = [
        {
            "start": edges[b],
            "end": edges[b + 1],
            "ppl": _ppl(bucket_nll[b], int(bucket_n[b])) if bucket_n[b] else None,
            "n_tokens": int(bucket_n[b]),
            "nll_sum": float(bucket_nll[b]),
        }
        for b in range(len(edges) - 1)
    ]
    return PerplexityResult(
        length=length,
        ppl=_ppl(nll_sum, n_tokens),
        nll_sum=nll_sum,
        n_tokens=n_tokens,
        n_docs=len(plans),
        ci_low=ci_low,
        ci_high=ci_high,
        buckets=buckets,
        protocol=_protocol(length, bos_token_id, stride, num_docs, seed),
    )


# ---------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023)

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey trial: ``input_ids`` (exactly ``length`` tokens, answer included).

    ``input_ids[answer_start:]`` are the answer's tokens; the model must predict each of them
    greedily from the tokens before it.
    """

    input_ids: list[int]
    answer_start: int
    key: str

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start :]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _separator(tokenizer: Any) -> str:
    """ " " between sentences, unless the tokenizer adds its own word prefix (SentencePiece)."""
    # A SentencePiece tokenizer encodes "The" as "▁The" already; a leading space would add a
    # lone "▁" token. A byte-level BPE needs the space to produce the usual " The" token.
    return "" if len(_encode(tokenizer, " The")) > len(_encode(tokenizer, "The")) else " "


def _answer_ids(tokenizer: Any, question: list[int], sep: str, key: str) -> list[int]:
    """The key's tokens as they follow the question in one string (BPE merges across the join)."""
    joint = _encode(tokenizer, PASSKEY_QUESTION + " " + key)
    if joint[: len(question)] == question and len(joint) > len(question):
        return joint[len(question) :]
    return _encode(tokenizer, sep + key)


def _filler(tokenizer: Any, sep: str, n_tokens: int) -> tuple[list[int], list[int]]:
    """``n_tokens`` of repeated filler, and the token offsets where its sentences start/end.

    Whole sentences are trimmed from the front, so only the filler's first sentence may be
    partial and the needle can sit right before the question at depth 1.
    """
    sentences = [
        _encode(tokenizer, sep + s.strip() + ".") for s in PASSKEY_FILLER.split(".") if s.strip()
    ]
    ids: list[int] = []
    boundaries = [0]
    while len(ids) < n_tokens:
        for sentence in sentences:
            ids.extend(sentence)
            boundaries.append(len(ids))
    extra = len(ids) - n_tokens
    return ids[extra:], [0] + [b - extra for b in boundaries if b > extra]


def build_passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """BOS + task + filler + needle (at ``depth`` of the filler) + filler + question + answer.

    Parts are tokenized separately and concatenated at the token level, and the filler is cut
    at a token boundary, so the total is exactly ``length`` tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise CtxextError(f"passkey depth {depth} is outside [0, 1]; use fractions like 0.5")
    sep = _separator(tokenizer)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    task = _encode(tokenizer, PASSKEY_TASK)
    needle = _encode(tokenizer, sep + PASSKEY_NEEDLE.format(key=key))
    question = _encode(tokenizer, sep + PASSKEY_QUESTION)
    answer = _answer_ids(tokenizer, _encode(tokenizer, PASSKEY_QUESTION), sep, key)
    fixed = len(bos) + len(task) + len(needle) + len(question) + len(answer)
    n_filler = length - fixed
    if n_filler < 0:
        raise CtxextError(
            f"passkey length {length} is too short for the prompt ({fixed} tokens without "
            "filler); use longer lengths"
        )
    filler, boundaries = _filler(tokenizer, sep, n_filler)
    # The needle goes at the sentence boundary nearest the requested depth, so no filler
    # sentence is split around it.
    cut = min(boundaries, key=lambda b: abs(b - depth * n_filler))
    ids = bos + task + filler[:cut] + needle + filler[cut:] + question + answer
    return PasskeyPrompt(input_ids=ids, answer_start=len(ids) - len(answer), key=key)


@torch.inference_mode()
def _passkey_correct(model: Any, prompt: PasskeyPrompt) -> bool:
    """Teacher-forced greedy check: argmax at every answer position equals the answer token.

    This is exactly "greedy decoding's first tokens are the answer's tokens" (by induction on
    the answer's tokens), at the cost of one forward pass and a head over len(answer) positions.
    """
    ids = torch.tensor([prompt.input_ids])
    hidden = _final_hidden(model, ids, None)
    rows = hidden[prompt.answer_start - 1 : len(prompt.input_ids) - 1]
    predicted = _head(model)(rows).argmax(dim=-1).cpu().tolist()
    return predicted == prompt.answer_ids


@dataclass
class PasskeyResult:
    """Accuracy per length x depth: ``accuracy[i][j]`` is lengths[i] at depths[j]."""

    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]
    correct: list[list[int]]
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_by_length"] = {
            str(n): float(np.mean(row)) for n, row in zip(self.lengths, self.accuracy, strict=True)
        }
        return d


@torch.inference_mode()
def evaluate_passkey(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> PasskeyResult:
    """Passkey retrieval accuracy for every length x depth, ``trials`` random 5-digit keys each.

    ``progress(tokens_done)`` is called after each trial with the cumulative tokens fed; the
    total is ``sum(lengths) * len(depths) * trials``.
    """
    if trials < 1:
        raise CtxextError(f"--trials must be at least 1, got {trials}")
    rng = np.random.default_rng(seed)
    correct = [[0] * len(depths) for _ in lengths]
    done = 0
    with _eval_mode(model):
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                for _ in range(trials):
                    key = str(int(rng.integers(10_000, 100_000)))
                    prompt = build_passkey_prompt(tokenizer, length, depth, key)
                    correct[i][j] += _passkey_correct(model, prompt)
                    done += length
                    if progress is not None:
                        progress(done)
    return PasskeyResult(
        lengths=list(lengths),
        depths=list(depths),
        trials=trials,
        accuracy=[[c / trials for c in row] for row in correct],
        correct=correct,
        protocol={
            "name": "passkey",
            "prompt": "BOS + task + filler + needle at depth + filler + question + answer; "
            "exactly `length` tokens including the answer (no position >= length is used)",
            "depth": "fraction of the filler tokens placed before the needle",
            "scoring": "teacher-forced greedy: correct iff the argmax at every answer position is "
            "the answer's token (equals greedy decoding of the answer's tokens)",
            "keys": f"uniform 5-digit integers, numpy default_rng(seed={seed}), drawn in "
            "length, depth, trial order",
        },
    )
