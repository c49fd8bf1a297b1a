"""What a perplexity number means: tokens and their bytes, which documents and windows are
scored at each length, and the ``protocol`` dict every result carries.

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

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from ctxext.config import DocSelection  # the schema's names: same, per-length
from ctxext.errors import CtxextError

#: The first position bucket is [0, 256); each next one doubles: [256, 512), [512, 1024), ...
FIRST_BUCKET_END = 256
BOOTSTRAP_RESAMPLES = 1000


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


#: Normalizers that never make a text longer than its UTF-8 bytes (+ a prefix character).
_SHORT_NORMALIZERS = ("Prepend", "Replace", "Strip", "Lowercase", "Sequence")


def _token_bound(tokenizer: Any) -> Callable[[int], int] | None:
    """bytes -> at most so many tokens, for a fast tokenizer whose normalizer cannot lengthen
    the text: every token then covers at least one byte (or one character, no shorter), plus a
    prefix space or two; None for any other tokenizer (NFKC can turn one character into 18)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    normalizer = backend.normalizer
    if normalizer is not None:
        text = repr(normalizer)
        kinds = set(re.findall(r"\b([A-Z][A-Za-z]*)\(", text))
        lengthens = "Replace" in kinds and not _short_replaces(text)
        if lengthens or not kinds <= set(_SHORT_NORMALIZERS):
            return None
    return lambda size: size + 2


def _short_replaces(text: str) -> bool:
    """Every Replace(..., content=C) puts in at most one character."""
    contents = re.findall(r'content="((?:[^"\\]|\\.)*)"', text)
    return bool(contents) and all(len(c) <= 1 for c in contents)


def check_longest(tokenizer: Any, texts: Sequence[str], length: int, bos: bool) -> None:
    """Refuse a ``length`` no document holds (a BOS is prepended when ``bos``), tokenizing only
    the documents that could: the longest by bytes first, while their size allows ``length``
    tokens (or more than the longest found, for the message). Nothing is refused when the
    tokenizer's tokens per byte cannot be bounded (the full tokenization decides then)."""
    bound = _token_bound(tokenizer)
    if bound is None:
        return
    need = length - bos
    sizes = sorted(
        ((len(t.encode("utf-8", "surrogatepass")), i) for i, t in enumerate(texts)), reverse=True
    )
    best = 0
    for size, i in sizes:
        if bound(size) < need and bound(size) <= best:
            break
        ids = tokenizer(texts[i], add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= need:
            return
        best = max(best, len(ids))
    raise too_short(length, best + bos, bos)


def too_short(length: int, longest: int, bos: bool) -> CtxextError:
    """The refusal of a length longer than every document (``longest``: its tokens, BOS
    included when ``bos``)."""
    return CtxextError(
        f"no document has at least {length} tokens (the longest has {longest} tokens"
        f"{', BOS included' if bos else ''}, so lengths up to {longest} fit); lower --lengths "
        "or use longer data"
    )


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
# Which documents, which forward passes


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
class ForwardPass:
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
class PassPlan:
    selection: dict[int, list[int]]  # length -> scored document indices (ascending)
    passes: list[ForwardPass]
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
        raise too_short(length, longest, bool(prefix))
    if num_docs is not None and num_docs < len(eligible):
        rng = np.random.default_rng(seed)
        eligible = sorted(rng.choice(eligible, size=num_docs, replace=False).tolist())
    return eligible


def plan_passes(
    doc_token_ids: Sequence[Sequence[int]],
    lengths: Sequence[int],
    bos_token_id: int | None,
    stride: int | None,
    num_docs: int | None,
    seed: int,
    doc_selection: DocSelection = "same",
    one_pass: bool = False,
) -> PassPlan:
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
    if doc_selection not in get_args(DocSelection):
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
        passes.append(ForwardPass(d, n, seq, _windows(len(seq), n, stride), served))
    return PassPlan(selection, passes, one_pass)


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
    plan = plan_passes(doc_token_ids, [length], bos_token_id, stride, num_docs, seed)
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
    plan = plan_passes(doc_token_ids, lengths, bos_token_id, None, num_docs, seed, doc_selection)
    return plan.selection


def perplexity_sweep_tokens(
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
    plan = plan_passes(
        doc_token_ids, lengths, bos_token_id, stride, num_docs, seed, doc_selection, one_pass
    )
    return sum(p.tokens for p in plan.passes)


def doc_fingerprint(doc_indices: Sequence[int], doc_token_ids: Sequence[Sequence[int]]) -> str:
    """sha256 (16 hex) of the scored documents: their indices in the data and full token ids."""
    h = hashlib.sha256()
    for i in doc_indices:
        ids = np.asarray(doc_token_ids[i], dtype=np.int64)
        h.update(np.array([i, len(ids)], dtype=np.int64).tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The protocol dict


BPB_FORMULA = (
    "bits per byte = total NLL (nats) / (ln 2 x UTF-8 bytes of the scored tokens' text); "
    "bytes per token = those bytes / scored tokens; a token's bytes run from the end of the "
    "previous token to its own end (tokenizer character offsets)"
)


def perplexity_protocol(
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
