"""ctxext.evaluate.perplexity: the protocols equal the model's own loss; buckets, interval, one
pass per sweep, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch
from eval_fixtures import (  # noqa: F401 (fixtures)
    BOS,
    VOCAB,
    bundled_fixture,
    docs_fixture,
    llama_fixture,
    model_loss_sum,
    one_thread_fixture,
)

from ctxext.evaluate.perplexity import evaluate_lengths, evaluate_perplexity
from ctxext.evaluate.protocol import (
    perplexity_sweep_tokens,
    tokenize_for_eval,
)


def test_truncate_equals_model_loss(llama, docs):
    length = 64
    res = evaluate_perplexity(llama, docs, length, bos_token_id=BOS)
    total, n = 0.0, 0
    for doc in docs:
        if len(doc) + 1 >= length:
            s, k = model_loss_sum(llama, [BOS, *doc][:length])
            total, n = total + s, n + k
    assert res.n_docs == 5 and res.n_tokens == n == 5 * (length - 1)
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-4)
    assert res.protocol["name"] == "truncate" and res.protocol["bos_prepended"]


def test_truncate_without_bos(llama, docs):
    res = evaluate_perplexity(llama, docs, 150, bos_token_id=None)
    assert res.n_docs == 3  # 150, 300, 220: "at least L tokens" with nothing prepended
    total = sum(model_loss_sum(llama, d[:150])[0] for d in docs if len(d) >= 150)
    assert res.ppl == pytest.approx(math.exp(total / res.n_tokens), rel=1e-4)


def _sliding_reference(model, docs, length, stride, bos):
    """The HF guide's loop, written independently: label masking instead of slicing."""
    total, n = 0.0, 0
    for doc in docs:
        seq = [bos, *doc]
        if len(seq) < length:
            continue
        scored_to = 1
        ends = list(range(length, len(seq) + 1, stride))
        if ends[-1] != len(seq):
            ends.append(len(seq))
        for end in ends:
            begin = end - length
            first = max(scored_to, begin + 1)
            s, k = model_loss_sum(model, seq[begin:end], first_scored=first - begin)
            total, n = total + s, n + k
            scored_to = end
    return total, n


@pytest.mark.parametrize("stride", [16, 50])
def test_sliding_equals_model_loss(llama, docs, stride):
    length = 64
    res = evaluate_perplexity(llama, docs, length, bos_token_id=BOS, stride=stride, chunk_size=13)
    total, n = _sliding_reference(llama, docs, length, stride, BOS)
    # stride < length: every token after position 0 of each eligible document is scored once
    assert res.n_tokens == n == sum(len(d) for d in docs if len(d) + 1 >= length)
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-4)
    assert res.protocol["name"] == "sliding" and res.protocol["stride"] == stride


def test_sliding_stride_equal_length_is_disjoint_windows(llama):
    length = 32
    g = torch.Generator().manual_seed(5)
    # BOS + doc is an exact multiple of the length: 3 and 2 windows
    docs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3 * 32 - 1, 2 * 32 - 1)]
    res = evaluate_perplexity(llama, docs, length, bos_token_id=BOS, stride=length)
    windows = []
    for doc in docs:
        seq = [BOS, *doc]
        windows += [seq[i : i + length] for i in range(0, len(seq), length)]
    disjoint = evaluate_perplexity(llama, windows, length, bos_token_id=None)
    assert res.n_tokens == disjoint.n_tokens == 5 * (length - 1)
    assert res.nll_sum == pytest.approx(disjoint.nll_sum, rel=1e-6)


def test_chunked_equals_unchunked(llama, docs):
    a = evaluate_perplexity(llama, docs, 100, bos_token_id=BOS, chunk_size=7)
    b = evaluate_perplexity(llama, docs, 100, bos_token_id=BOS, chunk_size=10_000)
    assert a.ppl == pytest.approx(b.ppl, rel=1e-6)


def test_buckets_add_up(llama, docs):
    length = 280  # buckets [0, 256) and [256, 280)
    res = evaluate_perplexity(llama, docs, length, bos_token_id=BOS)
    assert [(b["start"], b["end"]) for b in res.buckets] == [(0, 256), (256, 280)]
    assert [b["n_tokens"] for b in res.buckets] == [255, 24]  # position 0 is never predicted
    assert sum(b["n_tokens"] for b in res.buckets) == res.n_tokens
    combined = sum(b["n_tokens"] * math.log(b["ppl"]) for b in res.buckets) / res.n_tokens
    assert math.exp(combined) == pytest.approx(res.ppl, rel=1e-9)


def test_bootstrap_interval(llama, docs):
    res = evaluate_perplexity(llama, docs, 64, bos_token_id=BOS, seed=3)
    assert res.ci_low <= res.ppl <= res.ci_high
    assert res.ci_low < res.ci_high
    again = evaluate_perplexity(llama, docs, 64, bos_token_id=BOS, seed=3)
    assert (again.ci_low, again.ci_high) == (res.ci_low, res.ci_high)  # seeded


def _assert_same_results(a, b, rel=1e-6):
    assert a.keys() == b.keys()
    for n in a:
        x, y = a[n], b[n]
        assert (x.n_tokens, x.n_docs, x.n_bytes) == (y.n_tokens, y.n_docs, y.n_bytes)
        assert x.ppl == pytest.approx(y.ppl, rel=rel)
        assert x.nll_sum == pytest.approx(y.nll_sum, rel=rel)
        assert (x.ci_low, x.ci_high) == pytest.approx((y.ci_low, y.ci_high), rel=rel)
        assert len(x.buckets) == len(y.buckets)
        for bx, by in zip(x.buckets, y.buckets, strict=True):
            assert (bx["n_tokens"], bx["n_bytes"]) == (by["n_tokens"], by["n_bytes"])
            assert bx["ppl"] == pytest.approx(by["ppl"], rel=rel)


@pytest.mark.parametrize("selection", ["same", "per-length"])
def test_one_pass_equals_separate_passes_tiny(llama, docs, selection):
    kwargs = dict(bos_token_id=BOS, doc_selection=selection, chunk_size=13)
    lengths = [40, 64, 150, 280]
    seen: list[int] = []
    one = evaluate_lengths(llama, docs, lengths, progress=seen.append, **kwargs)
    sep = evaluate_lengths(llama, docs, lengths, one_pass=False, **kwargs)
    _assert_same_results(one, sep)
    assert one[40].passes.startswith("one forward pass") and sep[40].passes.startswith("separate")
    # one pass feeds each document once, at the longest length it is scored at
    plan = dict(bos_token_id=BOS, doc_selection=selection)
    assert seen[-1] == perplexity_sweep_tokens(docs, lengths, **plan)
    assert seen[-1] < perplexity_sweep_tokens(docs, lengths, one_pass=False, **plan)
    if selection == "same":
        assert seen[-1] == 280


def test_one_pass_equals_separate_passes_bundled(bundled):
    """On the bundled model, every length and bucket read from the 2048 pass equals its own."""
    model, tok, data = bundled
    kwargs = dict(bos_token_id=tok.bos_token_id, num_docs=4, token_bytes=data.token_bytes)
    lengths = [256, 512, 1024, 2048]
    one = evaluate_lengths(model, data.ids, lengths, **kwargs)
    sep = evaluate_lengths(model, data.ids, lengths, one_pass=False, **kwargs)
    _assert_same_results(one, sep)
    assert len({r.doc_fingerprint for r in one.values()}) == 1
    assert one[2048].passes != sep[2048].passes


def test_bits_per_byte_on_a_text_with_known_bytes(bundled):
    model, tok, _ = bundled
    text = "def caf\u00e9(x):\n    return '\u00fcber \u20ac \U0001f600' * x  # \u00e9t\u00e9\n"
    assert len(text) == 46 and len(text.encode("utf-8")) == 55  # é ü € 😀 é é: 9 extra bytes
    data = tokenize_for_eval(tok, [text])
    assert sum(data.token_bytes[0]) == 55
    n = len(data.ids[0])
    whole = evaluate_perplexity(
        model, data.ids, n + 1, bos_token_id=tok.bos_token_id, token_bytes=data.token_bytes
    )
    assert whole.n_tokens == n and whole.n_bytes == 55  # every token scored: every byte
    assert whole.bits_per_byte == pytest.approx(whole.nll_sum / (math.log(2) * 55), rel=1e-12)
    assert whole.bytes_per_token == pytest.approx(55 / n)
    # The first 9 tokens (BOS + 9 = length 10): the bytes of the text up to the 9th token's end.
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    part = evaluate_perplexity(
        model, data.ids, 10, bos_token_id=tok.bos_token_id, token_bytes=data.token_bytes
    )
    assert part.n_bytes == len(text[: offsets[8][1]].encode("utf-8"))
    assert sum(b["n_bytes"] for b in part.buckets) == part.n_bytes
    assert part.protocol["bits_per_byte"].startswith("bits per byte = total NLL")
