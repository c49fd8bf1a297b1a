"""LongCE and LongPPL against the reference (Fang et al. 2024, PKU-ML/LongPPL at commit 1decd2a).

The reference's loops are transcribed here from its files (finetune/finetune.py ``loss_weight``,
lines 21-44, and the loss, line 220; longppl/longppl.py ``find_key_token``, lines 22-48, and
``compute_longppl``, lines 161-173), with token positions where it maps key tokens through
character offsets. Nothing here calls ctxext to compute what it is compared with: ctxext's
short pass, weights, loss and key tokens must come out equal to the transcription.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from conftest import BUNDLED

from ctxext.evaluate.longppl import (
    KEY_TOKEN_GAIN_NATS,
    KEY_TOKEN_MAX_NLL,
    key_token_ppl,
    longppl_sweep,
    short_chunks,
    short_nll,
)
from ctxext.finetune.loss import LONGCE_MAX_WEIGHT, longce_loss, longce_weights

TRUNC_LEN, SLIDING = 32, 8  # the reference's 4096 and 1024, scaled down (same 4:1 ratio)


# --------------------------------------------------------------------------- the reference


def reference_contexts(max_len: int, trunc_len: int, sliding_window: int) -> dict[int, range]:
    """longppl.py lines 34-42 (finetune.py 31-39 is the same loop): for each target position
    the reference scores in its short pass, the positions its short input holds before it."""
    contexts = {}
    for start_token in range(0, max_len - trunc_len, sliding_window):
        if start_token + trunc_len + sliding_window > max_len:
            sliding_window = max_len - start_token - trunc_len
        # input_ids_short = input_ids[:, start_token: start_token+trunc_len+sliding_window];
        # logits[trunc_len-1: trunc_len+sliding_window-1] predict the targets after them.
        for i in range(sliding_window):
            target = start_token + trunc_len + i
            contexts[target] = range(start_token, target)
    return contexts


def reference_loss_weight(model, input_ids, trunc_len, internal, thre):
    """finetune.py lines 21-44, as written (the model's logits; no BOS handling)."""
    loss_f = torch.nn.CrossEntropyLoss(reduction="none")
    _, max_len = input_ids.shape
    output_full = model(input_ids)
    loss = loss_f(output_full.logits[0, :-1, :], input_ids[0, 1:])
    loss_discrepancy = torch.ones(input_ids.shape[-1], device=input_ids.device)
    with torch.no_grad():
        for start_token in range(0, max_len - trunc_len, internal):
            if start_token + trunc_len + internal > max_len:
                internal = max_len - start_token - trunc_len
            input_ids_short = input_ids[:, start_token : start_token + trunc_len + internal]
            output_short = model(input_ids_short)
            loss_full = loss[start_token + trunc_len - 1 : start_token + trunc_len + internal - 1]
            loss_short = loss_f(
                output_short.logits[0, trunc_len - 1 : trunc_len + internal - 1, :],
                input_ids_short[0, trunc_len : trunc_len + internal],
            )
            loss_discrepancy[start_token + trunc_len : start_token + trunc_len + internal] = (
                torch.exp(loss_short - loss_full).squeeze()
            )
    weight = torch.clamp(loss_discrepancy[1:], max=thre)
    return weight, loss


def reference_longppl(model, input_ids, trunc_len, sliding_window, alpha=2, beta=-2):
    """longppl.py find_key_token (lines 22-48) and compute_longppl (161-173), the model its own
    evaluator, key tokens as positions (what its offsets map back to: loss index = position -
    1, cal_overlap line 80). Returns (LongPPL or None, number of key tokens)."""
    loss_f = torch.nn.CrossEntropyLoss(reduction="none")
    with torch.no_grad():
        output_full = model(input_ids)
    _, max_len = input_ids.shape
    key_tokens = []
    with torch.no_grad():
        for start_token in range(0, max_len - trunc_len, sliding_window):
            if start_token + trunc_len + sliding_window > max_len:
                sliding_window = max_len - start_token - trunc_len
            input_ids_short = input_ids[:, start_token : start_token + trunc_len + sliding_window]
            output_short = model(input_ids_short)
            loss_full = loss_f(
                output_full.logits[
                    0, start_token + trunc_len - 1 : start_token + trunc_len + sliding_window - 1
                ],
                input_ids[0, start_token + trunc_len : start_token + trunc_len + sliding_window],
            )
            loss_short = loss_f(
                output_short.logits[0, trunc_len - 1 : trunc_len + sliding_window - 1, :],
                input_ids_short[0, trunc_len : trunc_len + sliding_window],
            )
            is_key = torch.logical_and((loss_short - loss_full) > alpha, loss_full < (beta * -1))
            key_tokens += [start_token + trunc_len + i for i, k in enumerate(is_key) if k]
        loss_overall = loss_f(output_full.logits[0, :-1, :], input_ids[0, 1:]).numpy()
    if not key_tokens:
        return None, 0
    loss_key = loss_overall[[p - 1 for p in key_tokens]]
    return float(np.exp(loss_key.astype(np.float64).mean())), len(key_tokens)


# --------------------------------------------------------------------------- the context per token


@pytest.mark.parametrize(
    ("length", "window", "stride"), [(60, 16, 5), (64, 16, 4), (95, 32, 8), (40, 39, 1), (20, 8, 8)]
)
def test_every_token_reads_the_references_short_context(length, window, stride):
    """Which positions each target reads in ctxext's short pass (its chunk, from the chunk's
    start to the target) equals the reference's; a target the reference does not cut, or cuts
    in its first chunk (which starts at 0), reads its whole context."""
    ours = {}
    for start, stop in short_chunks(length, window, stride):
        for target in range(start + window, stop):
            assert target not in ours  # each target scored once
            ours[target] = range(start, target)
    ref = reference_contexts(length, window, stride)
    for target in range(1, length):
        want = ref.get(target, range(0, target))
        assert ours.get(target, range(0, target)) == want, target
        if target in ours:  # a cut token reads W to W + S - 1 positions, never fewer than W
            assert window <= len(ours[target]) <= window + stride - 1


@pytest.fixture(scope="module")
def bundled():
    """The bundled model and a held-out file's first 95 tokens, without BOS (the reference's
    chunks start mid-text; a row without BOS is the case where ctxext runs them unchanged)."""
    from transformers import AutoModelForCausalLM

    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    tok = load_tokenizer(BUNDLED)
    text = next(iter(stdlib_documents("heldout"))).text
    ids = tok(text, add_special_tokens=False)["input_ids"][:95]
    assert ids[0] != tok.bos_token_id
    return model, tok.bos_token_id, torch.tensor([ids])


@pytest.mark.parametrize("bos", [False, True])
def test_the_short_pass_feeds_the_references_chunks(bundled, bos):
    """What the decoder is fed (a public forward pre-hook): the reference's short inputs after
    its first (whose targets read their whole context), each with BOS in place of its first
    token when the row starts with BOS; and every target's NLL equals a fresh forward over
    exactly the context the reference gives it."""
    model, bos_id, ids = bundled
    seq = [bos_id, *ids[0, 1:].tolist()] if bos else ids[0].tolist()
    seen: list[list[int]] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True
    )
    full = torch.zeros(len(seq) - 1)  # marks the targets the short pass does not fill
    try:
        short = short_nll(model, seq, TRUNC_LEN, SLIDING, bos=bos, full=full)
    finally:
        hook.remove()
    contexts = reference_contexts(len(seq), TRUNC_LEN, SLIDING)
    starts = sorted({ctx.start for ctx in contexts.values()} - {0})
    stops = [min(s + TRUNC_LEN + SLIDING, len(seq)) for s in starts]
    first = [bos_id] if bos else []
    assert seen == [first + seq[s + len(first) : e] for s, e in zip(starts, stops, strict=True)]
    for target in range(1, len(seq)):
        ctx = contexts.get(target, range(0, target))
        if ctx.start == 0:  # not cut: left to the full-context NLL
            assert short[target - 1] == 0.0
            continue
        text = first + seq[ctx.start + len(first) : target]
        with torch.no_grad():
            logits = model(torch.tensor([text])).logits[0, -1]
        want = torch.nn.functional.cross_entropy(logits[None], torch.tensor([seq[target]]))
        assert short[target - 1].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)


def test_the_short_pass_never_holds_more_than_a_chunk_of_logits(bundled):
    """The LM head sees at most ``chunk_size`` positions at a time, in the full pass and in
    every short chunk: no [length x vocab] logits."""
    model, _, ids = bundled
    rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: rows.append(out.shape[-2] if out.dim() > 1 else 1)
    )
    try:
        short_nll(model, ids[0].tolist(), TRUNC_LEN, SLIDING, bos=False, chunk_size=5)
    finally:
        hook.remove()
    assert rows and max(rows) == 5 and sum(rows) > len(ids[0])  # full pass + chunks


# --------------------------------------------------------------------------- LongCE


def test_longce_weights_and_loss_equal_the_reference(bundled):
    model, _, ids = bundled
    want_w, want_nll = reference_loss_weight(model, ids, TRUNC_LEN, SLIDING, thre=5.0)
    want_loss = torch.mean(want_nll * want_w)  # finetune.py line 220
    got_w = longce_weights(model, ids, want_nll[None], TRUNC_LEN, SLIDING)[0]
    torch.testing.assert_close(got_w, want_w.detach(), rtol=1e-4, atol=1e-5)
    assert LONGCE_MAX_WEIGHT == 5.0
    assert (want_w[TRUNC_LEN + SLIDING - 1 :] != 1).all()  # past W + S - 1 the weights differ
    inputs = {"input_ids": ids, "labels": ids}
    loss, _ = longce_loss(model, model, inputs, TRUNC_LEN, SLIDING, contextlib.nullcontext())
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)


def _random_nll(rng: np.random.Generator, vocab: int = 11, n: int = 400) -> tuple:
    """NLLs of random targets under random full-context and short-context logits (numpy
    log-softmax), as float64 arrays, and the same as torch tensors through cross_entropy."""
    full_logits = rng.normal(0, 3, (n, vocab))
    short_logits = full_logits + rng.normal(0, 3, (n, vocab))
    targets = rng.integers(0, vocab, n)

    def numpy_nll(logits):
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(n), targets]

    def torch_nll(logits):
        t = torch.tensor(logits, dtype=torch.float32)
        return torch.nn.functional.cross_entropy(t, torch.tensor(targets), reduction="none")

    return (numpy_nll(full_logits), numpy_nll(short_logits)), (
        torch_nll(full_logits),
        torch_nll(short_logits),
    )


def test_longce_formula_on_random_logits():
    """The weight is min(exp(short - full), 5), no floor; the loss the plain mean of weight x
    full NLL (finetune.py lines 40, 42, 220): numpy here, ctxext's function there."""
    from ctxext.finetune.loss import weights_from_nll

    (full, short), (full_t, short_t) = _random_nll(np.random.default_rng(0))
    weight = np.minimum(np.exp(short - full), 5.0)
    assert (weight == 5.0).any() and weight.min() < 0.05  # the cap and no floor both matter
    got = weights_from_nll(short_t, full_t)
    np.testing.assert_allclose(got.numpy(), weight, rtol=1e-4, atol=1e-6)
    assert (got * full_t).mean().item() == pytest.approx((weight * full).mean(), rel=1e-4)


def test_longppl_formula_on_random_logits():
    """Key tokens: gain (short - full) > 2 and full NLL < 2, both strict (longppl.py line 44,
    alpha 2, beta -2); LongPPL = exp(mean full NLL over them) (line 173): numpy here."""
    (full, short), (full_t, short_t) = _random_nll(np.random.default_rng(1))
    key = ((short - full) > 2) & (full < 2)
    gain_only = (short - full) > 2
    assert 0 < key.sum() < gain_only.sum()  # the second condition removes some
    want = math.exp(full[key].mean())
    got, count = key_token_ppl([full_t], [short_t])
    assert count == key.sum() and got == pytest.approx(want, rel=1e-5)
    assert (KEY_TOKEN_GAIN_NATS, KEY_TOKEN_MAX_NLL) == (2.0, 2.0)


def test_a_token_the_long_context_helps_but_still_gets_wrong_is_not_key():
    # gain > 2 with full NLL >= 2: not key (at 2.0 exactly too: "< 2" is strict); gain of
    # exactly 2: not key ("> 2" is strict); gain 2.5 with full 1.0: key.
    full = torch.tensor([3.0, 2.0, 1.0, 0.5, 1.0])
    short = torch.tensor([9.0, 4.5, 3.0, 2.5, 3.5])
    ppl, count = key_token_ppl([full], [short])
    assert count == 1 and ppl == pytest.approx(math.exp(1.0))


def test_longppl_equals_the_reference_on_the_bundled_model(bundled):
    """`--task longppl`'s key tokens and their perplexity, the model its own evaluator, equal
    the reference's find_key_token + compute_longppl on the same tokens."""
    model, _, ids = bundled
    # The text's first 60 tokens twice: the second copy can be copied from 60 tokens back, out
    # of the short context (32 to 39 tokens), which is what makes key tokens.
    ids = ids[:, :60].repeat(1, 2)
    want_ppl, want_count = reference_longppl(model, ids, TRUNC_LEN, SLIDING)
    n = ids.shape[1]
    (res,) = longppl_sweep(
        model, [ids[0].tolist()], [n], window=TRUNC_LEN, stride=SLIDING, bos=False
    ).values()
    assert want_count > 0 and res.key_tokens == want_count
    assert res.key_fraction == pytest.approx(want_count / (n - 1))
    assert res.key_ppl == pytest.approx(want_ppl, rel=1e-4)
    # The reference's gain-only count is larger here: the second condition is at work.
    _, gain_only = reference_longppl(model, ids, TRUNC_LEN, SLIDING, beta=-1e9)
    assert gain_only > want_count
