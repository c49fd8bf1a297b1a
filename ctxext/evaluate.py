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

* ``truncate`` (default; YaRN's ``--truncate``): at length L, every scored document is scored on
  its first L tokens: the sequence is BOS + the first L-1 document tokens (when the tokenizer
  has a BOS), and the L-1 tokens after position 0 are scored. Without a BOS the sequence is the
  first L document tokens, again L-1 scored.
* ``sliding`` with stride S (the Hugging Face guide "Perplexity of fixed-length models"): over
  each whole scored document (BOS only at its start), windows of exactly L tokens ending at L,
  L+S, L+2S, ... and a last one ending at the document's end; each window scores only the tokens
  no earlier window scored, so with S < L every token after position 0 is scored exactly once,
  each with at least L-S tokens of context. With S == L the windows are disjoint and each
  window's first token is context only (not scored).

Which documents (``doc_selection``): ``same`` (default, YaRN's protocol) scores the documents
with at least L_max tokens (BOS included), L_max the longest length of the sweep, at *every*
length, so a sweep changes nothing but the length; ``per-length`` scores, at each L, every
document with at least L tokens (more documents at short lengths, different sets).
``num_docs`` keeps a seeded random sample of the eligible documents (in their original order),
the same sample at every length under ``same``.

Both protocols are token-weighted: PPL = exp(total NLL / total scored tokens). Bits per byte =
total NLL / (ln 2 x UTF-8 bytes of the scored tokens' text), with a token's bytes running from
the end of the previous token to its own end (the tokenizer's character offsets); unlike
perplexity it compares models with different tokenizers. The 95% interval is a percentile
bootstrap over documents (resample documents with replacement, recompute the token-weighted PPL;
1000 resamples, seeded).

One pass per sweep: under the truncate protocol the loss of a document's first L tokens is the
prefix of the loss of its first L_max tokens (causal attention), as long as the rope
frequencies do not depend on the input's length, so :func:`evaluate_lengths` runs each document
once and reads every length from that pass. Dynamic NTK (and longrope, or any rope type not
known to be static) and ``--stride`` keep one pass per length, with the rotary state reset
before each length and task (:func:`reset_rotary_state`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ctxext.errors import CtxextError

__all__ = [
    "BPB_FORMULA",
    "DEFAULT_DEPTHS",
    "DocSelection",
    "PasskeyPrompt",
    "PasskeyResult",
    "PerplexityResult",
    "TokenizedDocs",
    "bootstrap_ratio",
    "bucket_edges",
    "build_passkey_prompt",
    "default_chunk_size",
    "doc_fingerprint",
    "evaluate_lengths",
    "evaluate_passkey",
    "evaluate_perplexity",
    "length_dependent_rope",
    "planned_sweep_tokens",
    "planned_tokens",
    "reset_rotary_state",
    "select_documents",
    "token_nll",
    "tokenize_for_eval",
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
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk):
        stop = min(start + chunk, targets.shape[0])
        logits = head(hidden[start:stop])
        # With --device-map auto the LM head may sit on another device than the last layer
        # (tied embeddings: the first one); the targets go where the logits are.
        nll = F.cross_entropy(logits, targets[start:stop].to(logits.device), reduction="none")
        out[start:stop] = nll.to(out.device)
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


# ---------------------------------------------------------------------------------------------
# Tokens and their bytes


@dataclass(frozen=True)
class TokenizedDocs:
    """Token ids of each document (no special tokens) and each token's UTF-8 byte count.

    ``token_bytes[d][k]`` is the number of bytes from the end of token k-1 (the document's start
    for k = 0) to the end of token k, read from the tokenizer's character offsets; a document's
    counts add up to the bytes of its text up to its last token. ``None`` when the tokenizer gives
    no offsets (Python "slow" tokenizers).
    """

    ids: list[list[int]]
    token_bytes: list[list[int]] | None


def tokenize_for_eval(tokenizer: Any, texts: Sequence[str]) -> TokenizedDocs:
    """Tokenize ``texts`` once, keeping what bits per byte needs (the tokens' byte counts)."""
    texts = list(texts)
    # verbose=False: long documents are the point here (no "longer than the maximum" warning).
    kwargs = {"add_special_tokens": False, "verbose": False}
    try:
        enc = tokenizer(texts, return_offsets_mapping=True, **kwargs)
    except NotImplementedError:  # slow tokenizers have no offsets
        enc = tokenizer(texts, **kwargs)
        return TokenizedDocs([list(ids) for ids in enc["input_ids"]], None)
    counts = [
        _token_bytes(text, offsets)
        for text, offsets in zip(texts, enc["offset_mapping"], strict=True)
    ]
    return TokenizedDocs([list(ids) for ids in enc["input_ids"]], counts)


def _token_bytes(text: str, offsets: Sequence[Sequence[int]]) -> list[int]:
    """Per-token UTF-8 byte counts from character offsets (see :class:`TokenizedDocs`)."""
    if not offsets:
        return []
    raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    # Byte offset of each character (continuation bytes are 10xxxxxx), then of the text's end.
    char_to_byte = np.append(np.flatnonzero((raw & 0xC0) != 0x80), len(raw))
    # Byte-level BPE can split one character over several tokens, all with that character's
    # span: the first token gets its bytes, the others none (a running max keeps ends ordered).
    ends = np.maximum.accumulate(np.array([end for _, end in offsets], dtype=np.int64))
    return np.diff(char_to_byte[ends], prepend=0).tolist()


# ---------------------------------------------------------------------------------------------
# Perplexity: which documents, which forward passes


DocSelection = Literal["same", "per-length"]
#: Rope types whose frequencies do not depend on the sequence length (transformers' names).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "yarn", "llama3"})


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
class _Pass:
    """The forward passes over one document at one model-input ``length``.

    ``serves`` are the evaluated lengths read from these passes: just ``length`` itself, or in
    one-pass mode every length the document is scored at (each a prefix of the pass).
    """

    doc: int
    length: int
    seq: list[int]
    windows: list[_Window]
    serves: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(w.end - w.begin for w in self.windows)


@dataclass(frozen=True)
class _Plan:
    selection: dict[int, list[int]]  # length -> scored document indices (ascending)
    passes: list[_Pass]
    one_pass: bool


def _check_request(lengths: Sequence[int], stride: int | None, num_docs: int | None) -> None:
    if not lengths:
        raise CtxextError("no lengths to evaluate; pass --lengths, e.g. 256,512")
    for length in lengths:
        if length < 2:
            raise CtxextError(f"length {length} is too short; use lengths of at least 2 tokens")
        if stride is not None and not 1 <= stride <= length:
            raise CtxextError(f"stride {stride} must be between 1 and the length {length}")
    if num_docs is not None and num_docs < 1:
        raise CtxextError(f"--num-docs must be at least 1, got {num_docs}")


def _eligible(
    doc_token_ids: Sequence[Sequence[int]],
    length: int,
    prefix: int,
    num_docs: int | None,
    seed: int,
) -> list[int]:
    """Documents with at least ``length`` tokens (BOS included), or a seeded sample of them."""
    eligible = [i for i, ids in enumerate(doc_token_ids) if prefix + len(ids) >= length]
    if not eligible:
        longest = prefix + max((len(ids) for ids in doc_token_ids), default=0)
        raise CtxextError(
            f"no document has at least {length} tokens (the longest has {longest} tokens"
            f"{', BOS included' if prefix else ''}); lower --lengths or use longer data"
        )
    if num_docs is not None and num_docs < len(eligible):
        rng = np.random.default_rng(seed)
        eligible = sorted(rng.choice(eligible, size=num_docs, replace=False).tolist())
    return eligible


def _plan(
    doc_token_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    bos_token_id: int | None,
    stride: int | None,
    num_docs: int | None,
    seed: int,
    doc_selection: DocSelection = "same",
    one_pass: bool = False,
) -> _Plan:
    """Which documents are scored at each length, and through which forward passes.

    ``same``: the documents eligible at the longest length are scored at every length (YaRN's
    protocol: a length changes nothing but the length). ``per-length``: each length scores every
    document eligible at it. ``one_pass`` (truncate only) reads every length of a document from
    one pass at its longest length: under causal attention the first L positions of a longer
    input compute exactly what an input of L tokens computes, as long as the rope frequencies do
    not depend on the input's length.
    """
    lengths = sorted(set(lengths))
    _check_request(lengths, stride, num_docs)
    if doc_selection not in ("same", "per-length"):
        raise CtxextError(f"unknown document selection {doc_selection!r}; use same or per-length")
    prefix = [] if bos_token_id is None else [bos_token_id]
    if doc_selection == "same":
        common = _eligible(doc_token_ids, lengths[-1], len(prefix), num_docs, seed)
        selection = {n: common for n in lengths}
    else:
        selection = {n: _eligible(doc_token_ids, n, len(prefix), num_docs, seed) for n in lengths}
    one_pass = one_pass and stride is None
    if one_pass:
        serves: dict[int, list[int]] = {}
        for n in lengths:
            for d in selection[n]:
                serves.setdefault(d, []).append(n)
        keys = [(d, max(ns), tuple(ns)) for d, ns in sorted(serves.items())]
    else:  # grouped by length, so length-dependent rope state changes once per length
        keys = [(d, n, (n,)) for n in lengths for d in selection[n]]
    passes = []
    for d, n, served in keys:
        ids = doc_token_ids[d] if stride is not None else doc_token_ids[d][:n]
        seq = (prefix + list(ids))[: None if stride is not None else n]
        passes.append(_Pass(d, n, seq, _windows(len(seq), n, stride), served))
    return _Plan(selection, passes, one_pass)


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
    plan = _plan(doc_token_ids, [length], bos_token_id, stride, num_docs, seed)
    return sum(p.tokens for p in plan.passes)


def select_documents(
    doc_token_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    bos_token_id: int | None,
    num_docs: int | None = None,
    seed: int = 0,
    doc_selection: DocSelection = "same",
) -> dict[int, list[int]]:
    """The documents (indices) scored at each length, exactly as ``evaluate_lengths`` picks them
    under the truncate protocol (other tasks use it to read the same documents)."""
    plan = _plan(doc_token_ids, lengths, bos_token_id, None, num_docs, seed, doc_selection)
    return plan.selection


def planned_sweep_tokens(
    doc_token_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    bos_token_id: int | None,
    stride: int | None = None,
    num_docs: int | None = None,
    seed: int = 0,
    doc_selection: DocSelection = "same",
    one_pass: bool = True,
) -> int:
    """Tokens ``evaluate_lengths`` will feed (give it the same arguments; ``one_pass`` as it
    resolves it: ``one_pass and not length_dependent_rope(model)``)."""
    plan = _plan(
        doc_token_ids, lengths, bos_token_id, stride, num_docs, seed, doc_selection, one_pass
    )
    return sum(p.tokens for p in plan.passes)


def _rope_types(config: Any) -> set[str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict) or not params:
        return set()
    entries = [params] if ("rope_type" in params or "type" in params) else list(params.values())
    return {
        str(e.get("rope_type", e.get("type", "default"))) for e in entries if isinstance(e, dict)
    }


def length_dependent_rope(model: Any) -> bool:
    """Whether the model's rope frequencies may depend on the input's length.

    transformers' dynamic NTK recomputes them for longer inputs and longrope switches factor
    lists past the original length; any rope type not known to be static counts as dependent.
    """
    return not _rope_types(_text_config(model)) <= _STATIC_ROPE_TYPES


@torch.inference_mode()
def reset_rotary_state(model: Any) -> None:
    """Put length-dependent rotary state back to its initial value, through the public forward.

    transformers' dynamic NTK keeps the frequencies of the longest input seen so far and goes
    back to the original ones only on an input shorter than the original length, so what an
    input of L tokens gets depends on what ran before. A one-token forward is such an input; a
    static config is unchanged by it. Called before every length and task.
    """
    ids = torch.zeros((1, 1), dtype=torch.long, device=_device(model))
    with _eval_mode(model):
        _decoder(model)(input_ids=ids, use_cache=False)


# ---------------------------------------------------------------------------------------------
# Perplexity: results


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


def doc_fingerprint(doc_indices: Sequence[int], doc_token_ids: Sequence[Sequence[int]]) -> str:
    """sha256 (16 hex) of the scored documents: their indices in the data and full token ids."""
    h = hashlib.sha256()
    for i in doc_indices:
        ids = np.asarray(doc_token_ids[i], dtype=np.int64)
        h.update(np.array([i, len(ids)], dtype=np.int64).tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()[:16]


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


BPB_FORMULA = (
    "bits per byte = total NLL (nats) / (ln 2 x UTF-8 bytes of the scored tokens' text); "
    "bytes per token = those bytes / scored tokens; a token's bytes run from the end of the "
    "previous token to its own end (tokenizer character offsets)"
)


def _protocol(
    length: int,
    lengths: Sequence[int],
    bos_token_id: int | None,
    stride: int | None,
    num_docs: int | None,
    seed: int,
    doc_selection: DocSelection,
) -> dict[str, Any]:
    bos = bos_token_id is not None
    longest = max(lengths)
    which = (
        f"each document with at least {longest} tokens (the longest length evaluated)"
        if doc_selection == "same"
        else f"each document with at least {length} tokens"
    )
    if stride is None:
        desc = (
            f"first {length} tokens of {which}"
            + (f" (BOS + first {length - 1} document tokens)" if bos else "")
            + f"; {length - 1} tokens scored per document"
        )
    else:
        desc = (
            f"sliding windows of {length} tokens, stride {stride}, over the whole of {which}"
            f"{' (BOS at the start only)' if bos else ''}; each window scores only tokens not "
            "scored before"
        )
    selection = (
        f"same documents at every length: those eligible at the longest length ({longest})"
        if doc_selection == "same"
        else "per length: every document eligible at that length (sets differ across lengths)"
    )
    return {
        "name": "truncate" if stride is None else "sliding",
        "description": desc,
        "stride": stride,
        "bos_prepended": bos,
        "bos_token_id": bos_token_id,
        "num_docs_cap": num_docs,
        "doc_selection": doc_selection,
        "documents": selection,
        "doc_sample": "all eligible"
        if num_docs is None
        else f"seeded sample of at most {num_docs} (seed {seed})",
        "weighting": "token-weighted: exp(total NLL / total scored tokens)",
        "bits_per_byte": BPB_FORMULA,
        "interval": f"95% percentile bootstrap over documents, {BOOTSTRAP_RESAMPLES} resamples, "
        f"seed {seed}",
        "buckets": "by position of the predicted token within the model input",
    }


def _run_pass(
    model: Any,
    p: _Pass,
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
    every forward pass; the total is :func:`planned_sweep_tokens` with the same arguments.
    """
    one_pass = one_pass and not length_dependent_rope(model)
    plan = _plan(
        doc_token_ids, lengths, bos_token_id, stride, num_docs, seed, doc_selection, one_pass
    )
    prefix = 0 if bos_token_id is None else 1
    _check_head(model, plan.passes[0].seq)
    tallies = {n: _Tally(n, docs, token_bytes is not None) for n, docs in plan.selection.items()}
    done, current = 0, None
    with _eval_mode(model):
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
            _protocol(n, list(plan.selection), bos_token_id, stride, num_docs, seed, doc_selection),
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
def _passkey_score(model: Any, prompt: PasskeyPrompt) -> tuple[bool, float]:
    """Teacher-forced greedy check and the answer's NLL (nats, summed over its tokens).

    Correct iff the argmax at every answer position equals the answer token: exactly "greedy
    decoding's first tokens are the answer's tokens" (by induction on the answer's tokens), at
    the cost of one forward pass and a head over len(answer) positions.
    """
    ids = torch.tensor([prompt.input_ids])
    hidden = _final_hidden(model, ids, None)
    rows = hidden[prompt.answer_start - 1 : len(prompt.input_ids) - 1]
    logits = _head(model)(rows)
    target = torch.tensor(prompt.answer_ids, device=logits.device)
    nll = F.cross_entropy(logits, target, reduction="sum").double().item()
    return logits.argmax(dim=-1).cpu().tolist() == prompt.answer_ids, nll


def _passkey_correct(model: Any, prompt: PasskeyPrompt) -> bool:
    """Teacher-forced greedy check (see :func:`_passkey_score`)."""
    return _passkey_score(model, prompt)[0]


@dataclass
class PasskeyResult:
    """Accuracy per length x depth: ``accuracy[i][j]`` is lengths[i] at depths[j]."""

    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]
    correct: list[list[int]]
    protocol: dict[str, Any] = field(default_factory=dict)
    answer_nll: list[list[float]] = field(default_factory=list)
    """Mean over trials of the answer tokens' summed NLL (nats), per length x depth."""

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
    nll = [[0.0] * len(depths) for _ in lengths]
    done = 0
    with _eval_mode(model):
        for i, length in enumerate(lengths):
            reset_rotary_state(model)  # exact dynamic NTK whatever ran before
            for j, depth in enumerate(depths):
                for _ in range(trials):
                    key = str(int(rng.integers(10_000, 100_000)))
                    prompt = build_passkey_prompt(tokenizer, length, depth, key)
                    ok, answer_nll = _passkey_score(model, prompt)
                    correct[i][j] += ok
                    nll[i][j] += answer_nll / trials
                    done += length
                    if progress is not None:
                        progress(done)
    return PasskeyResult(
        lengths=list(lengths),
        depths=list(depths),
        trials=trials,
        accuracy=[[c / trials for c in row] for row in correct],
        correct=correct,
        answer_nll=nll,
        protocol={
            "name": "passkey",
            "prompt": "BOS + task + filler + needle at depth + filler + question + answer; "
            "exactly `length` tokens including the answer (no position >= length is used)",
            "depth": "fraction of the filler tokens placed before the needle",
            "scoring": "teacher-forced greedy: correct iff the argmax at every answer position is "
            "the answer's token (equals greedy decoding of the answer's tokens); answer_nll: "
            "mean over trials of the answer tokens' summed NLL (nats)",
            "keys": f"uniform 5-digit integers, numpy default_rng(seed={seed}), drawn in "
            "length, depth, trial order",
        },
    )
