"""ctxext.evaluate.loss: the chunked loss equals the model's own, per architecture; the rotary
state is reset between passes (dynamic NTK is exact whatever ran before)."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import (  # noqa: F401 (fixtures)
    VOCAB,
    build,
    bundled_fixture,
    llama_fixture,
    one_thread_fixture,
)
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
from ctxext.evaluate.loss import length_dependent_rope, reset_rotary_state, token_nll
from ctxext.evaluate.passkey import (
    evaluate_passkey,
)
from ctxext.evaluate.perplexity import evaluate_lengths

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
    model = build(model_cls, config_cls, **extra)
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
    capped = build(model_cls, config_cls, **extra)
    uncapped = build(model_cls, config_cls, **{**extra, "final_logit_softcapping": None})
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


def test_retrieval_after_ppl_equals_retrieval_alone_with_dynamic_ntk(dynamic):
    """`eval -m dynamic --task ppl --task retrieval`: retrieval after a ppl sweep to 2048 reads
    what it reads alone, and every prompt, also a shorter length after a longer one, is read as
    from a reset rotary state (its final hidden states, seen through a public forward hook,
    equal a fresh forward's)."""
    from ctxext.evaluate.retrieval import evaluate_retrieval

    model, tok, data = dynamic
    ids, bos = data.ids, tok.bos_token_id
    decoder = model.get_decoder()

    def retrieval():
        return evaluate_retrieval(
            model, tok, [600, 300], template="code", doc_token_ids=ids, depths=[0.5], trials=2
        )

    reset_rotary_state(model)
    alone = retrieval()
    evaluate_lengths(model, ids, [512, 2048], bos_token_id=bos, num_docs=1)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 32:  # the prompts, not the head check or resets
            seen.append((kwargs["input_ids"].clone(), output.last_hidden_state.clone()))

    handle = decoder.register_forward_hook(record, with_kwargs=True)
    try:
        after = retrieval()
    finally:
        handle.remove()
    assert after.answer_nll == alone.answer_nll and after.correct == alone.correct
    assert all(n > 0 for row in alone.answer_nll for n in row)
    assert [x.shape[1] for x, _ in seen] == [600, 600, 300, 300]
    for x, hidden in seen:
        reset_rotary_state(model)
        with torch.inference_mode():
            assert torch.equal(decoder(input_ids=x, use_cache=False).last_hidden_state, hidden)
