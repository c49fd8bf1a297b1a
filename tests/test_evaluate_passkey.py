"""ctxext.evaluate.passkey: exact-length prompts, teacher-forced scoring equals greedy decoding,
accuracy on a model built to answer known trials."""

from __future__ import annotations

import re

import pytest
import torch
from eval_fixtures import (  # noqa: F401 (fixtures)
    SMALL,
    VOCAB,
    llama_fixture,
    one_thread_fixture,
)
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
)

from ctxext.errors import CtxextError
from ctxext.evaluate.needles import PasskeyPrompt
from ctxext.evaluate.passkey import (
    PASSKEY_FILLER,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    build_passkey_prompt,
    evaluate_passkey,
)
from ctxext.evaluate.scoring import answer_correct


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
    assert answer_correct(llama, greedy)
    wrong = [*generated[:-1], (generated[-1] + 1) % VOCAB]
    assert not answer_correct(llama, PasskeyPrompt(context + wrong, len(context), "?"))


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
