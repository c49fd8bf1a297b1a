"""Chunked perplexity equals the model's own loss; protocols, buckets, interval, passkey."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import BUNDLED
from hypothesis import given
from hypothesis import strategies as st
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from ctxext.config import ExtendConfig
from ctxext.errors import CtxextError
from ctxext.evaluate import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    PasskeyPrompt,
    _passkey_correct,
    _windows,
    bucket_edges,
    build_passkey_prompt,
    evaluate_lengths,
    evaluate_passkey,
    evaluate_perplexity,
    length_dependent_rope,
    planned_sweep_tokens,
    planned_tokens,
    reset_rotary_state,
    token_nll,
    tokenize_for_eval,
)

VOCAB = 512
BOS = 1
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait
    for each other make every forward pass 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _build(LlamaForCausalLM, LlamaConfig, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(1)
    lengths = [40, 150, 97, 300, 64, 220]
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _model_loss_sum(model, seq, first_scored=1):
    """Reference: the model's own loss over targets first_scored..len-1, as a sum (float64)."""
    ids = torch.tensor([seq])
    labels = ids.clone()
    labels[0, :first_scored] = -100  # target t is labels[t]; the model shifts internally
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=labels).loss.double().item()
    n = len(seq) - first_scored
    return loss * n, n


# --- token_nll -------------------------------------------------------------------------------


ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    # Gemma 2 softcaps the final logits (and attention, which needs eager attention).
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        {"head_dim": 16, "final_logit_softcapping": 2.0, "attn_implementation": "eager"},
    ),
    "cohere": (CohereForCausalLM, CohereConfig, {"logit_scale": 0.3}),
    "granite": (GraniteForCausalLM, GraniteConfig, {"logits_scaling": 4.0}),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_token_nll_equals_model_loss_per_token(arch):
    model_cls, config_cls, extra = ARCHS[arch]
    model = _build(model_cls, config_cls, **extra)
    ids = torch.randint(0, VOCAB, (1, 83), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out = model(input_ids=ids, labels=ids)
        ref = torch.nn.functional.cross_entropy(
            out.logits[0, :-1].float(), ids[0, 1:], reduction="none"
        )
    for chunk in (None, 1, 7, 82, 1000):  # 7 does not divide 82; 1000 exceeds it
        ours = token_nll(model, ids, chunk_size=chunk)
        assert ours.shape == (82,)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert token_nll(model, ids).double().mean().item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_softcapping_is_applied():
    """The Gemma 2 case must differ from the same weights without softcapping (it is tested)."""
    model_cls, config_cls, extra = ARCHS["gemma2"]
    capped = _build(model_cls, config_cls, **extra)
    uncapped = _build(model_cls, config_cls, **{**extra, "final_logit_softcapping": None})
    uncapped.load_state_dict(capped.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(token_nll(capped, ids), token_nll(uncapped, ids))


def test_token_nll_position_ids(llama):
    ids = torch.randint(0, VOCAB, (1, 50), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(0, 100, 2).unsqueeze(0)  # stretched: a mere offset would change nothing
    with torch.inference_mode():
        ref = llama(input_ids=ids, position_ids=pos, labels=ids).loss.item()
        plain = llama(input_ids=ids, labels=ids).loss.item()
    ours = token_nll(llama, ids, position_ids=pos, chunk_size=9).double().mean().item()
    assert ours == pytest.approx(ref, rel=1e-5)
    assert abs(ref - plain) > 1e-5  # the positions really changed something


def test_token_nll_restores_training_flag(llama):
    llama.train()
    try:
        token_nll(llama, torch.tensor([[5, 6, 7]]))
        assert llama.training
    finally:
        llama.eval()


# --- perplexity protocols --------------------------------------------------------------------


def test_truncate_equals_model_loss(llama, docs):
    length = 64
    res = evaluate_perplexity(llama, docs, length, bos_token_id=BOS)
    total, n = 0.0, 0
    for doc in docs:
        if len(doc) + 1 >= length:
            s, k = _model_loss_sum(llama, [BOS, *doc][:length])
            total, n = total + s, n + k
    assert res.n_docs == 5 and res.n_tokens == n == 5 * (length - 1)
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-4)
    assert res.protocol["name"] == "truncate" and res.protocol["bos_prepended"]


def test_truncate_without_bos(llama, docs):
    res = evaluate_perplexity(llama, docs, 150, bos_token_id=None)
    assert res.n_docs == 3  # 150, 300, 220: "at least L tokens" with nothing prepended
    total = sum(_model_loss_sum(llama, d[:150])[0] for d in docs if len(d) >= 150)
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
            s, k = _model_loss_sum(model, seq[begin:end], first_scored=first - begin)
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


def test_bucket_edges():
    assert bucket_edges(100) == [0, 100]
    assert bucket_edges(256) == [0, 256]
    assert bucket_edges(4096) == [0, 256, 512, 1024, 2048, 4096]
    assert bucket_edges(3000) == [0, 256, 512, 1024, 2048, 3000]


def test_bootstrap_interval(llama, docs):
    res = evaluate_perplexity(llama, docs, 64, bos_token_id=BOS, seed=3)
    assert res.ci_low <= res.ppl <= res.ci_high
    assert res.ci_low < res.ci_high
    again = evaluate_perplexity(llama, docs, 64, bos_token_id=BOS, seed=3)
    assert (again.ci_low, again.ci_high) == (res.ci_low, res.ci_high)  # seeded


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


# --- passkey ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from ctxext.bundled_train import train_tokenizer

    texts = [
        PASSKEY_TASK,
        PASSKEY_FILLER * 3,
        PASSKEY_NEEDLE.format(key=12345),
        PASSKEY_QUESTION,
        " ".join(str(i) for i in range(2000)),
    ]
    return train_tokenizer(texts, VOCAB)


@pytest.mark.parametrize("length", [160, 203, 400])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_has_exact_length(tokenizer, length, depth):
    p = build_passkey_prompt(tokenizer, length, depth, "48213")
    assert len(p.input_ids) == length
    assert p.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(p.answer_ids).strip() == "48213"
    text = tokenizer.decode(p.input_ids)
    assert text.endswith("What is the pass key? The pass key is 48213")
    assert "The pass key is 48213. Remember it. 48213 is the pass key." in text


def test_passkey_depth_moves_needle(tokenizer):
    positions = [
        tokenizer.decode(build_passkey_prompt(tokenizer, 600, d, "11111").input_ids).find("11111")
        for d in (0.0, 0.5, 1.0)
    ]
    assert positions == sorted(positions) and len(set(positions)) == 3
    text = tokenizer.decode(build_passkey_prompt(tokenizer, 600, 1.0, "11111").input_ids)
    assert "11111 is the pass key. What is the pass key?" in text  # needle right before question


def test_passkey_too_short(tokenizer):
    with pytest.raises(CtxextError, match="too short"):
        build_passkey_prompt(tokenizer, 20, 0.5, "12345")


def test_teacher_forced_check_equals_greedy_decoding(llama, tokenizer):
    prompt = build_passkey_prompt(tokenizer, 180, 0.5, "12345")
    context = prompt.input_ids[: prompt.answer_start]
    k = len(prompt.answer_ids)
    with torch.inference_mode():
        generated = llama.generate(
            torch.tensor([context]), max_new_tokens=k, min_new_tokens=k, do_sample=False
        )[0, len(context) :].tolist()
    greedy = PasskeyPrompt(input_ids=context + generated, answer_start=len(context), key="?")
    assert _passkey_correct(llama, greedy)
    wrong = [*generated[:-1], (generated[-1] + 1) % VOCAB]
    assert not _passkey_correct(llama, PasskeyPrompt(context + wrong, len(context), "?"))


def test_evaluate_passkey_shape(llama, tokenizer):
    seen: list[int] = []
    res = evaluate_passkey(
        llama, tokenizer, [160, 200], depths=[0.0, 1.0], trials=2, progress=seen.append
    )
    assert len(res.accuracy) == 2 and all(len(row) == 2 for row in res.accuracy)
    assert all(0.0 <= a <= 1.0 for row in res.accuracy for a in row)
    assert seen[-1] == (160 + 200) * 2 * 2
    d = res.to_dict()
    assert set(d["mean_by_length"]) == {"160", "200"} and d["trials"] == 2


# --- same documents, one pass, dynamic NTK, bits per byte (issue 14) --------------------------


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
    assert seen[-1] == planned_sweep_tokens(docs, lengths, **plan)
    assert seen[-1] < planned_sweep_tokens(docs, lengths, one_pass=False, **plan)
    if selection == "same":
        assert seen[-1] == 280


@pytest.fixture(scope="module")
def bundled():
    from ctxext.evaluate import tokenize_for_eval
    from ctxext.modeling import load_causal_lm, load_tokenizer

    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    from ctxext.data import load_documents

    tok = load_tokenizer(BUNDLED)
    texts = [d.text for d in load_documents(None, split="heldout")]
    return load_causal_lm(None, dtype="float32").model, tok, tokenize_for_eval(tok, texts)


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


@pytest.fixture(scope="module")
def dynamic(bundled):
    from ctxext.modeling import load_causal_lm

    _, tok, data = bundled
    model = load_causal_lm(None, extend=ExtendConfig(method="dynamic", factor=8.0), dtype="float32")
    return model.model, tok, data


def test_dynamic_ntk_is_independent_of_what_ran_before(dynamic):
    """Dynamic NTK results are the same alone and after longer inputs, in every task."""
    model, tok, data = dynamic
    assert length_dependent_rope(model)
    ids, bos = data.ids, tok.bos_token_id
    passkey_alone = evaluate_passkey(model, tok, [300, 600], depths=[0.5], trials=2)
    fresh_512 = evaluate_lengths(model, ids, [512], bos_token_id=bos, num_docs=2)[512]
    # The hazard is real: after a 2048-token forward, transformers keeps the 2048 frequencies.
    seq = torch.tensor([[bos, *next(d for d in ids if len(d) >= 2047)[:2047]]])
    reset_rotary_state(model)
    reference = token_nll(model, seq[:, :512])
    token_nll(model, seq)
    assert not torch.equal(token_nll(model, seq[:, :512]), reference)
    # ppl up to 2048 first, then passkey (ppl then passkey == passkey alone), and ppl at 512.
    sweep = evaluate_lengths(model, ids, [512, 1024, 2048], bos_token_id=bos, num_docs=2)
    assert sweep[512].passes.startswith("separate")  # dynamic keeps one pass per length
    passkey_after = evaluate_passkey(model, tok, [300, 600], depths=[0.5], trials=2)
    assert passkey_after.answer_nll == passkey_alone.answer_nll
    assert passkey_after.correct == passkey_alone.correct
    token_nll(model, seq)
    after = evaluate_lengths(model, ids, [512], bos_token_id=bos, num_docs=2)[512]
    assert after.nll_sum == fresh_512.nll_sum


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


def _protocol_keys(n: int, seed: int) -> list[str]:
    """The keys evaluate_passkey draws, as its protocol documents them (length, depth, trial)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [str(int(rng.integers(10_000, 100_000))) for _ in range(n)]


def test_passkey_accuracy_equals_known_answer():
    """A model and tokenizer built so that exactly the known trials are answered right.

    A word-level tokenizer knows some keys as words; every other key is [UNK] (id 0). The
    model's final norm is zero, so all logits tie and the argmax is id 0 everywhere: a trial is
    correct iff its key is unknown to the tokenizer. Which keys those are is fixed by the
    documented key order, so accuracy per length x depth is known before running.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    lengths, depths, trials, seed = [90, 120], [0.0, 0.5, 1.0], 4, 7
    want = [[0, 1, 2], [3, 4, 1]]  # correct trials per length x depth, chosen
    keys = _protocol_keys(len(lengths) * len(depths) * trials, seed)
    assert len(set(keys)) == len(keys)
    # trial t of cell (i, j) has key keys[(i * len(depths) + j) * trials + t]; the tokenizer
    # knows the keys of the first trials - want[i][j] trials of each cell
    known = {
        keys[(i * len(depths) + j) * trials + t]
        for i in range(len(lengths))
        for j in range(len(depths))
        for t in range(trials - want[i][j])
    }
    words = " ".join([PASSKEY_TASK, PASSKEY_FILLER, PASSKEY_NEEDLE, PASSKEY_QUESTION])
    vocab = {"[UNK]": 0, "<s>": 1}
    for word in [*re.findall(r"\w+|[^\w\s]+", words), *sorted(known)]:
        vocab.setdefault(word, len(vocab))
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="[UNK]")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": len(vocab)})).eval()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    res = evaluate_passkey(model, tok, lengths, depths=depths, trials=trials, seed=seed)
    assert res.correct == want
    assert res.accuracy == [[c / trials for c in row] for row in want]
    mean = res.to_dict()["mean_by_length"]
    assert mean == {
        str(n): sum(row) / len(row) for n, row in zip(lengths, res.accuracy, strict=True)
    }
