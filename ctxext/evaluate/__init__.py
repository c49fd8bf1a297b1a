"""Evaluation of a causal LM at long contexts: exact, memory-lean perplexity and passkey retrieval.

* :mod:`~ctxext.evaluate.loss`: the chunked loss through the LM head (never ``[length x
  vocab]`` logits) and the rotary state between passes.
* :mod:`~ctxext.evaluate.protocol`: tokens and their bytes, which documents and windows are
  scored at each length, and the ``protocol`` dict every result carries.
* :mod:`~ctxext.evaluate.perplexity`: perplexity, bits per byte, position buckets and the
  bootstrap interval over a sweep of lengths.
* :mod:`~ctxext.evaluate.passkey`: passkey retrieval (Mohtashami & Jaggi 2023).

The names below are the package's public API, re-exported from those modules.
"""

from ctxext.evaluate.loss import (
    default_chunk_size,
    length_dependent_rope,
    reset_rotary_state,
    token_nll,
)
from ctxext.evaluate.passkey import (
    DEFAULT_DEPTHS,
    PasskeyPrompt,
    PasskeyResult,
    build_passkey_prompt,
    evaluate_passkey,
)
from ctxext.evaluate.perplexity import (
    PerplexityResult,
    bootstrap_ratio,
    evaluate_lengths,
    evaluate_perplexity,
)
from ctxext.evaluate.protocol import (
    BPB_FORMULA,
    DocSelection,
    TokenizedDocs,
    bucket_edges,
    doc_fingerprint,
    planned_sweep_tokens,
    planned_tokens,
    select_documents,
    tokenize_for_eval,
)

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
