"""ctxext.evaluate.protocol: which documents and windows are scored, buckets, planned tokens."""

from __future__ import annotations

import math

import pytest
from eval_fixtures import (  # noqa: F401 (fixtures)
    BOS,
    docs_fixture,
    llama_fixture,
    one_thread_fixture,
)
from hypothesis import given
from hypothesis import strategies as st

from ctxext.errors import CtxextError
from ctxext.evaluate.perplexity import evaluate_lengths, evaluate_perplexity
from ctxext.evaluate.protocol import (
    _windows,
    bucket_edges,
    planned_tokens,
)


@given(st.integers(2, 40), st.data())
def test_sliding_windows_cover_each_token_once(length, data):
    n = data.draw(st.integers(length, 5 * length), label="n")
    stride = data.draw(st.integers(1, length), label="stride")
    windows = _windows(n, length, stride)
    scored = [t for w in windows for t in range(w.first, w.end)]
    assert all(w.end - w.begin == length and w.begin < w.first for w in windows)
    assert windows[-1].end == n and len(scored) == len(set(scored))
    if stride < length:  # every token but the first, each with >= length - stride context
        assert scored == list(range(1, n))
        assert all(w.first - w.begin >= min(length - stride, w.first) for w in windows)


def test_bucket_edges():
    assert bucket_edges(100) == [0, 100]
    assert bucket_edges(256) == [0, 256]
    assert bucket_edges(4096) == [0, 256, 512, 1024, 2048, 4096]
    assert bucket_edges(3000) == [0, 256, 512, 1024, 2048, 3000]


def test_num_docs_is_seeded_sample_and_progress_total(llama, docs):
    seen: list[int] = []
    kwargs = dict(bos_token_id=BOS, num_docs=3, seed=7)
    res = evaluate_perplexity(llama, docs, 64, progress=seen.append, **kwargs)
    assert res.n_docs == 3 and res.n_tokens == 3 * 63
    assert seen == sorted(seen) and seen[-1] == planned_tokens(docs, 64, **kwargs) == 3 * 64
    again = evaluate_perplexity(llama, docs, 64, **kwargs)
    assert again.nll_sum == res.nll_sum
    assert planned_tokens(docs, 64, bos_token_id=BOS, stride=16) == sum(
        64 * (1 + math.ceil((len(d) + 1 - 64) / 16)) for d in docs if len(d) + 1 >= 64
    )
    assert res.to_dict()["protocol"]["doc_sample"].startswith("seeded sample")


def test_too_short_data(llama):
    with pytest.raises(
        CtxextError, match=r"no document has at least 128 tokens \(the longest has 51"
    ):
        evaluate_perplexity(llama, [[5] * 50, [6] * 20], 128, bos_token_id=BOS)
    with pytest.raises(CtxextError, match="stride"):
        evaluate_perplexity(llama, [[5] * 50], 16, bos_token_id=BOS, stride=17)


def test_same_documents_at_every_length(llama, docs):
    """By default the documents long enough for the longest length are scored at every length."""
    same = evaluate_lengths(llama, docs, [64, 200], bos_token_id=BOS)
    assert [same[n].n_docs for n in (64, 200)] == [2, 2]  # the 300- and 220-token documents
    assert same[64].doc_fingerprint == same[200].doc_fingerprint
    assert same[64].protocol["doc_selection"] == "same"
    alone = evaluate_perplexity(llama, [docs[3], docs[5]], 64, bos_token_id=BOS)
    assert same[64].nll_sum == pytest.approx(alone.nll_sum, rel=1e-6)
    per = evaluate_lengths(llama, docs, [64, 200], bos_token_id=BOS, doc_selection="per-length")
    assert [per[n].n_docs for n in (64, 200)] == [5, 2]
    assert per[64].doc_fingerprint != per[200].doc_fingerprint
    assert per[64].nll_sum == evaluate_perplexity(llama, docs, 64, bos_token_id=BOS).nll_sum
    sampled = evaluate_lengths(llama, docs, [64, 150], bos_token_id=BOS, num_docs=2, seed=4)
    assert sampled[64].doc_fingerprint == sampled[150].doc_fingerprint  # the same sample
    assert sampled[64].n_docs == sampled[150].n_docs == 2
