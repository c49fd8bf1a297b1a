"""Far-context gain, code retrieval and effective length, on tiny real Llamas built here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from ctxext.errors import CtxextError
from ctxext.evaluate.context_use import (
    ContextUseResult,
    _local_windows,
    context_use,
    local_nll,
)
from ctxext.evaluate.effective_length import Reference, Tally, effective_length, judge
from ctxext.evaluate.retrieval import evaluate_retrieval
from ctxext.evaluate.scoring import RetrievalResult

VOCAB = 320


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_llama(**overrides):
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(vocab_size=VOCAB, **sizes, **heads, **overrides)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama(max_position_embeddings=64, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def seqs():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (96,), generator=g).tolist() for _ in range(3)]


def _explicit_local(model, seq, window, bos):
    """Each token scored from exactly its own local window (BOS + its last window-1 tokens, or
    its last ``window`` tokens): one forward per token."""
    out = []
    with torch.no_grad():
        for p in range(1, len(seq)):
            ctx = seq[max(0, p - window) : p]
            if bos and p > window:
                ctx = [seq[0], *seq[p - window + 1 : p]]
            logits = model(torch.tensor([ctx])).logits[0, -1]
            out.append(F.cross_entropy(logits[None], torch.tensor([seq[p]])).item())
    return torch.tensor(out)


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("window", [16, 40])
def test_stride_one_equals_explicit_per_token_windows(llama, seqs, window, bos):
    ours = local_nll(llama, seqs[0], window, stride=1, bos=bos)
    ref = _explicit_local(llama, seqs[0], window, bos)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_cut_context_differs_from_full_context(llama, seqs):
    """The local NLL really cuts: it differs from the full context past the window."""
    from ctxext.evaluate.loss import token_nll

    full = token_nll(llama, torch.tensor([seqs[0]]))
    local = local_nll(llama, seqs[0], 16, stride=4, bos=True)
    assert torch.equal(local[:16], full[:16])  # positions 1..16 have nothing to cut
    assert (local[16:] - full[16:]).abs().max() > 1e-3


def test_larger_stride_reads_between_w_minus_s_and_w(llama, seqs):
    """With stride S, the token scored first in a window reads BOS + W-S tokens: its NLL equals
    a fresh forward over exactly those tokens."""
    window, stride = 24, 8
    seq = seqs[1]
    local = local_nll(llama, seq, window, stride, bos=True)
    last = len(seq) - 1
    first = last - stride + 1  # first target of the last window
    with torch.no_grad():
        ctx = [seq[0], *seq[last - window + 1 : first]]
        assert len(ctx) == 1 + window - stride
        logits = llama(torch.tensor([ctx])).logits[0, -1]
        ref = F.cross_entropy(logits[None], torch.tensor([seq[first]])).item()
    assert math.isclose(local[first - 1].item(), ref, rel_tol=1e-5, abs_tol=1e-5)


def test_windows_cover_every_far_target_once():
    for length, window, stride in [(96, 16, 4), (97, 16, 5), (40, 39, 1), (300, 64, 16)]:
        covered = []
        for last, n in _local_windows(length, window, stride):
            covered.extend(range(last - n + 1, last + 1))
        assert sorted(covered) == list(range(window + 1, length))


def test_gain_is_zero_when_window_covers_the_length(llama, seqs):
    res = context_use(llama, seqs, window=len(seqs[0]), bos=True)
    assert res.gain_bits == 0.0
    assert all(abs(b["gain_bits"]) < 1e-6 for b in res.buckets)


def test_gain_sign_and_buckets(llama, seqs):
    res = context_use(llama, seqs, window=16, stride=8, bos=True)
    by_hand = []
    from ctxext.evaluate.loss import token_nll

    for s in seqs:
        full = token_nll(llama, torch.tensor([s])).double()
        local = local_nll(llama, s, 16, 8, bos=True).double()
        by_hand.append(((local - full)[16:]).sum().item() / math.log(2))
    far_tokens = len(seqs) * (len(seqs[0]) - 1 - 16)
    assert math.isclose(res.gain_bits, sum(by_hand) / far_tokens, rel_tol=1e-6)
    assert res.ci_low <= res.gain_bits <= res.ci_high
    assert res.protocol["local_window"] == 16 and res.protocol["local_stride"] == 8
    assert "BOS + 8 to 15 tokens" in res.protocol["description"]
    assert sum(b["n_tokens"] for b in res.buckets) == len(seqs) * (len(seqs[0]) - 1)


def test_bad_window_is_refused(llama, seqs):
    with pytest.raises(CtxextError, match="local-stride"):
        local_nll(llama, seqs[0], 16, stride=17, bos=True)


# --- code retrieval ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from ctxext.bundled_train import train_tokenizer
    from ctxext.corpus import stdlib_documents

    texts = [d.text for _, d in zip(range(10), stdlib_documents("train"), strict=False)]
    return train_tokenizer([*texts, "TOKEN_7F3A = 48213\nassert TOKEN_7F3A == 48213"], 400)


@pytest.fixture(scope="module")
def code_ids(tokenizer):
    from ctxext.corpus import stdlib_documents

    docs = [d.text for _, d in zip(range(5), stdlib_documents("heldout"), strict=False)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in docs]


def test_random_model_retrieves_no_key(tokenizer, code_ids):
    """The negative control: a random-weight model has no way to copy a 5-digit key (a guess is
    right with probability ~1e-5 per trial). Only meaningful next to the positive test below."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    res = evaluate_retrieval(
        model, tokenizer, [128], template="code", doc_token_ids=code_ids, trials=3, depths=(0.5,)
    )
    assert res.accuracy == [[0.0]] and res.correct == [[0]]
    assert res.protocol["template"] == "code" and res.templates == ["plain-assert-upper"]


@pytest.fixture(scope="module")
def bundled_retrieval():
    """The bundled model's code retrieval at its trained length 256 and at 512, unscaled, 4 keys
    per depth. Issue 15 trained it to retrieve at 256 (tests/test_bundled.py: >= 90% over the
    depths; the 4500-step model misses some keys at depth 1, the key on the line just before the
    question); past 256 without scaling it breaks down (0% at 512 in docs/context-use-bundled)."""
    from conftest import BUNDLED

    from ctxext.data import load_documents, tokenize_documents
    from ctxext.modeling import load_causal_lm, load_tokenizer

    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    tok = load_tokenizer(BUNDLED)
    ids = tokenize_documents(tok, load_documents(None, split="heldout"))
    model = load_causal_lm(None, dtype="float32").model
    return evaluate_retrieval(model, tok, [256, 512], template="code", doc_token_ids=ids, trials=4)


def test_retrieval_known_answer_on_a_model_that_retrieves(bundled_retrieval):
    """A model that can retrieve gets every key at its trained length at depths 0-0.75 (and most
    at depth 1, its weakest): the scoring path (prompt, answer position, teacher-forced argmax)
    must count right answers as right, which a model that never retrieves cannot show."""
    res = bundled_retrieval
    assert res.depths == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert res.correct[0][:4] == [4] * 4 and res.accuracy[0][:4] == [1.0] * 4
    assert res.correct[0][4] >= 3, res.correct
    assert res.retrieves_at(256, threshold=0.75) and not res.retrieves_at(512)
    assert res.to_dict()["mean_by_length"]["256"] >= 0.95


def test_the_bundled_model_judged_against_itself_reads_to_its_trained_length(bundled_retrieval):
    """Judged against its own figures at 256 (the reference), the reference length passes
    whenever its family is judged (r >= max(floor, 0.9 r)); 512 fails (see above)."""
    ref = Reference.of(bundled_retrieval, 256, "bundled", "its own row")
    detail = judge([256, 512], bundled_retrieval, None, ref, 0.5)
    (family,) = detail["families"].values()  # the one template `code`: code (train)
    assert family["counted"] == (family["reference"]["accuracy"] >= 0.5)
    if family["counted"]:
        assert detail["lengths"]["256"]["counts"] and detail["effective_length"] == 256


#: A reference the hand-built `code` results below are judged against: threshold 90%.
_PERFECT = Reference("base", 256, {"code": Tally(8, 8)}, "hand-built")


def _effective(lengths, retrieval, gains):
    return effective_length(lengths, retrieval, gains, _PERFECT, 0.5)


def _retrieval(accuracy: dict[int, list[float]]) -> RetrievalResult:
    """Hand-built retrieval results: ``accuracy[length]`` per depth (4 trials each)."""
    rows = list(accuracy.values())
    return RetrievalResult(
        template="code",
        lengths=list(accuracy),
        depths=[0.0, 0.5, 1.0][: len(rows[0])],
        trials=4,
        accuracy=rows,
        correct=[[round(a * 4) for a in row] for row in rows],
    )


def _gain(length: int, last_ci_low: float, window: int = 256, total_ci_low: float = 0.0):
    """A hand-built far-context gain whose last bucket's interval starts at ``last_ci_low``."""
    buckets = [
        {"start": 0, "end": window, "gain_bits": 0.0, "ci_low": -1.0, "ci_high": 1.0},
        {"start": window, "end": length, "gain_bits": last_ci_low + 0.1,
         "ci_low": last_ci_low, "ci_high": last_ci_low + 0.2},
    ]  # fmt: skip
    return ContextUseResult(
        length=length,
        window=window,
        stride=window // 4,
        n_docs=8,
        gain_bits=total_ci_low + 0.1,
        ci_low=total_ci_low,
        ci_high=total_ci_low + 0.2,
        buckets=buckets,
    )


LENGTHS = [256, 512, 1024, 2048]
ALL_RETRIEVED = {n: [1.0, 1.0, 1.0] for n in LENGTHS}


def test_effective_length_gain_gates_lengths_beyond_the_window():
    retr = _retrieval(ALL_RETRIEVED)
    gains = {512: _gain(512, 0.01), 1024: _gain(1024, 0.02), 2048: _gain(2048, -0.01)}
    assert _effective(LENGTHS, retr, gains) == 1024  # 2048's interval reaches below 0
    gains[2048] = _gain(2048, 0.0)
    assert _effective(LENGTHS, retr, gains) == 1024  # "above 0" is strict
    gains[2048] = _gain(2048, 0.001)
    assert _effective(LENGTHS, retr, gains) == 2048
    gains[512] = _gain(512, -0.5)  # a short length's failure ends it
    assert _effective(LENGTHS, retr, gains) == 256
    assert _effective(LENGTHS, None, gains) == 256  # gains alone decide too


def test_effective_length_reads_the_last_bucket_not_the_total():
    retr = _retrieval({256: [1.0], 512: [1.0]})
    sure_total = {512: _gain(512, last_ci_low=-0.1, total_ci_low=0.3)}
    assert _effective([256, 512], retr, sure_total) == 256
    sure_last = {512: _gain(512, last_ci_low=0.1, total_ci_low=-0.3)}
    assert _effective([256, 512], retr, sure_last) == 512


def test_effective_length_window_and_missing_measurements():
    # A length within the window has nothing beyond it: its (negative) gain does not count.
    retr = _retrieval({256: [1.0], 512: [1.0]})
    assert _effective([256, 512], retr, {512: _gain(512, -1.0, window=512)}) == 512
    # A length whose retrieval or gain was not measured is not held against it.
    assert _effective([256, 512, 1024], retr, {1024: _gain(1024, 0.2)}) == 1024
    assert _effective([256, 512, 1024], retr, {}) == 1024
    # Nothing measured: no effective length.
    assert _effective([256], None, None) is None
    assert _effective([256], None, {}) is None


def test_sweep_equals_separate_runs_at_each_length(llama, seqs):
    from ctxext.evaluate.context_use import context_use_sweep

    sweep = context_use_sweep(llama, seqs, [16, 48, 96], window=16, stride=8, bos=True)
    assert sorted(sweep) == [48, 96]  # 16 has nothing beyond the window
    for n in (48, 96):
        alone = context_use(llama, [s[:n] for s in seqs], window=16, stride=8, bos=True)
        assert math.isclose(sweep[n].gain_bits, alone.gain_bits, rel_tol=1e-6, abs_tol=1e-9)
        for a, b in zip(sweep[n].buckets, alone.buckets, strict=True):
            assert math.isclose(a["gain_bits"], b["gain_bits"], rel_tol=1e-6, abs_tol=1e-9)


def test_sweep_with_dynamic_ntk_is_exact_per_length(seqs):
    """Dynamic NTK: a fresh full pass per length (after a rotary reset) and windows at the
    original frequencies; equal to each length evaluated alone on a fresh model."""
    from ctxext.evaluate.context_use import context_use_sweep

    def fresh():
        dynamic = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}
        return _tiny_llama(max_position_embeddings=32, rope_parameters=dynamic)

    model = fresh()
    sweep = context_use_sweep(model, seqs, [48, 96], window=32, stride=8, bos=True, one_pass=False)
    for n in (96, 48):  # the longer first: stale frequencies would show at 48
        alone = context_use(fresh(), [s[:n] for s in seqs], window=32, stride=8, bos=True)
        assert math.isclose(sweep[n].gain_bits, alone.gain_bits, rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("one_pass", [True, False])
def test_sweep_progress_ends_at_the_planned_total(llama, seqs, one_pass):
    from ctxext.evaluate.context_use import context_use_sweep, context_use_sweep_tokens

    seen: list[int] = []
    lengths = [16, 48, 96]
    context_use_sweep(
        llama,
        seqs,
        lengths,
        window=16,
        stride=6,
        bos=True,
        one_pass=one_pass,
        progress=seen.append,
    )
    assert seen[-1] == context_use_sweep_tokens(len(seqs), lengths, 16, 6, one_pass)
    assert context_use_sweep_tokens(len(seqs), [16], 16, 6, one_pass) == 0


# --- both passes start alike (BOS), on the bundled model ----------------------------------------


@pytest.fixture(scope="module")
def bundled_text():
    """The bundled model (trained with BOS at position 0) and a held-out file's first 320
    positions, BOS first."""
    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_causal_lm

    loaded = load_causal_lm(None, dtype="float32")
    tok = loaded.tokenizer
    docs = (tok(d.text, add_special_tokens=False)["input_ids"] for d in stdlib_documents("heldout"))
    seqs = [[tok.bos_token_id, *ids[:319]] for ids in docs if len(ids) >= 319]
    return loaded.model, tok.bos_token_id, seqs[:3]


def test_every_local_window_starts_with_bos_as_the_full_pass(bundled_text):
    """Every input the decoder sees (through a public forward pre-hook) starts with BOS, and
    every local window is exactly W positions long."""
    model, bos, seqs = bundled_text
    inputs: list[list[int]] = []

    def record(module, args, kwargs):
        inputs.append(kwargs["input_ids"][0].tolist())

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        res = context_use(model, seqs, window=64, stride=16, bos=True)
    finally:
        handle.remove()
    assert res.protocol["local_start"] == "BOS (as the full pass)"
    runs = [ids for ids in inputs if len(ids) > 1]  # not the one-token rotary resets
    assert {len(ids) for ids in runs} == {32, 64, 320}  # the head check, windows, full passes
    assert all(ids[0] == bos for ids in runs)
    windows = [ids for ids in runs if len(ids) == 64]
    assert len(windows) == len(seqs) * len(_local_windows(320, 64, 16))
    assert windows[0][1:] == seqs[0][320 - 64 : 319]  # BOS + the last W-1 tokens


# --- the chunked-loss check runs for every task ------------------------------------------------


class _ScaledLogits(LlamaForCausalLM):
    """A causal LM whose forward scales the logits after the head (as a remote-code model may),
    which ctxext's chunked loss does not replicate: every task must refuse it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 20.0
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


@pytest.mark.parametrize("task", ["ppl", "passkey", "retrieval", "context-use", "sweep", "longppl"])
def test_every_task_checks_the_chunked_loss_against_the_models_own(task, tokenizer, code_ids):
    from ctxext.evaluate.context_use import context_use_sweep
    from ctxext.evaluate.longppl import longppl_sweep
    from ctxext.evaluate.passkey import evaluate_passkey
    from ctxext.evaluate.perplexity import evaluate_lengths

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    heads = dict(num_attention_heads=2, num_key_value_heads=1)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **sizes, **heads)
    model = _ScaledLogits(config).eval()
    seqs = [ids[:200] for ids in code_ids if len(ids) >= 200]
    run = {
        "ppl": lambda: evaluate_lengths(model, code_ids, [128], bos_token_id=None),
        "passkey": lambda: evaluate_passkey(model, tokenizer, [400], depths=[0.5], trials=1),
        "retrieval": lambda: evaluate_retrieval(
            model, tokenizer, [128], template="code", doc_token_ids=code_ids, trials=1
        ),
        "context-use": lambda: context_use(model, seqs, window=64, bos=False),
        "sweep": lambda: context_use_sweep(model, seqs, [200], window=64, bos=False),
        "longppl": lambda: longppl_sweep(model, seqs, [200], window=64, bos=False),
    }[task]
    with pytest.raises(CtxextError, match="differs from its own loss"):
        run()
