"""Passkey retrieval (Mohtashami & Jaggi 2023): a key hidden at a depth of filler text, scored by
teacher-forced greedy decoding of its tokens (:mod:`ctxext.evaluate.scoring`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import Progress
from ctxext.evaluate.needles import PasskeyPrompt, encode, random_key
from ctxext.evaluate.scoring import RetrievalResult, score_grid

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


def _separator(tokenizer: Any) -> str:
    """ " " between sentences, unless the tokenizer adds its own word prefix (SentencePiece)."""
    # A SentencePiece tokenizer encodes "The" as "▁The" already; a leading space would add a
    # lone "▁" token. A byte-level BPE needs the space to produce the usual " The" token.
    return "" if len(encode(tokenizer, " The")) > len(encode(tokenizer, "The")) else " "


def _answer_ids(tokenizer: Any, question: list[int], sep: str, key: str) -> list[int]:
    """The key's tokens as they follow the question in one string (BPE merges across the join)."""
    joint = encode(tokenizer, PASSKEY_QUESTION + " " + key)
    if joint[: len(question)] == question and len(joint) > len(question):
        return joint[len(question) :]
    return encode(tokenizer, sep + key)


def _filler(tokenizer: Any, sep: str, n_tokens: int) -> tuple[list[int], list[int]]:
    """``n_tokens`` of repeated filler, and the token offsets where its sentences start/end.

    Whole sentences are trimmed from the front, so only the filler's first sentence may be
    partial and the needle can sit right before the question at depth 1.
    """
    sentences = [
        encode(tokenizer, sep + s.strip() + ".") for s in PASSKEY_FILLER.split(".") if s.strip()
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
    task = encode(tokenizer, PASSKEY_TASK)
    needle = encode(tokenizer, sep + PASSKEY_NEEDLE.format(key=key))
    question = encode(tokenizer, sep + PASSKEY_QUESTION)
    answer = _answer_ids(tokenizer, encode(tokenizer, PASSKEY_QUESTION), sep, key)
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


def evaluate_passkey(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> RetrievalResult:
    """Passkey retrieval accuracy for every length x depth, ``trials`` random 5-digit keys each.

    ``progress(tokens_done)`` is called after each trial with the cumulative tokens fed; the
    total is ``sum(lengths) * len(depths) * trials``.
    """
    rng = np.random.default_rng(seed)

    def prompt_for(length: int, depth: float, _: str) -> PasskeyPrompt:
        return build_passkey_prompt(tokenizer, length, depth, random_key(rng))

    correct, nll = score_grid(model, lengths, depths, trials, prompt_for, progress=progress)[
        "passkey"
    ]
    return RetrievalResult(
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
