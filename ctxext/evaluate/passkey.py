"""Passkey retrieval (Mohtashami & Jaggi 2023): a key hidden at a depth of filler text, scored by
teacher-forced greedy decoding of its tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import (
    Progress,
    _check_head,
    _eval_mode,
    _final_hidden,
    _head,
    reset_rotary_state,
)
from ctxext.needles import PasskeyPrompt, _encode, random_key

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
    return "" if len(_encode(tokenizer, " The")) > len(_encode(tokenizer, "The")) else " "


def _answer_ids(tokenizer: Any, question: list[int], sep: str, key: str) -> list[int]:
    """The key's tokens as they follow the question in one string (BPE merges across the join)."""
    joint = _encode(tokenizer, PASSKEY_QUESTION + " " + key)
    if joint[: len(question)] == question and len(joint) > len(question):
        return joint[len(question) :]
    return _encode(tokenizer, sep + key)


def _filler(tokenizer: Any, sep: str, n_tokens: int) -> tuple[list[int], list[int]]:
    """``n_tokens`` of repeated filler, and the token offsets where its sentences start/end.

    Whole sentences are trimmed from the front, so only the filler's first sentence may be
    partial and the needle can sit right before the question at depth 1.
    """
    sentences = [
        _encode(tokenizer, sep + s.strip() + ".") for s in PASSKEY_FILLER.split(".") if s.strip()
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
    task = _encode(tokenizer, PASSKEY_TASK)
    needle = _encode(tokenizer, sep + PASSKEY_NEEDLE.format(key=key))
    question = _encode(tokenizer, sep + PASSKEY_QUESTION)
    answer = _answer_ids(tokenizer, _encode(tokenizer, PASSKEY_QUESTION), sep, key)
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


@torch.inference_mode()
def _passkey_score(model: Any, prompt: PasskeyPrompt) -> tuple[bool, float]:
    """Teacher-forced greedy check and the answer's NLL (nats, summed over its tokens).

    Correct iff the argmax at every answer position equals the answer token: exactly "greedy
    decoding's first tokens are the answer's tokens" (by induction on the answer's tokens), at
    the cost of one forward pass and a head over len(answer) positions.
    """
    ids = torch.tensor([prompt.input_ids])
    hidden = _final_hidden(model, ids, None)
    rows = hidden[prompt.answer_start - 1 : len(prompt.input_ids) - 1]
    logits = _head(model)(rows)
    target = torch.tensor(prompt.answer_ids, device=logits.device)
    nll = F.cross_entropy(logits, target, reduction="sum").double().item()
    return logits.argmax(dim=-1).cpu().tolist() == prompt.answer_ids, nll


def _passkey_correct(model: Any, prompt: PasskeyPrompt) -> bool:
    """Teacher-forced greedy check (see :func:`_passkey_score`)."""
    return _passkey_score(model, prompt)[0]


@dataclass
class PasskeyResult:
    """Accuracy per length x depth: ``accuracy[i][j]`` is lengths[i] at depths[j]."""

    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]
    correct: list[list[int]]
    protocol: dict[str, Any] = field(default_factory=dict)
    answer_nll: list[list[float]] = field(default_factory=list)
    """Mean over trials of the answer tokens' summed NLL (nats), per length x depth."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_by_length"] = {
            str(n): float(np.mean(row)) for n, row in zip(self.lengths, self.accuracy, strict=True)
        }
        return d


#: prompt_for(length, depth, label) -> one trial's prompt in the form ``label`` (draws its key).
PromptFor = Callable[[int, float, str], PasskeyPrompt]
#: Per label: correct answers and mean answer NLL, each ``[length][depth]``.
GridScores = dict[str, tuple[list[list[int]], list[list[float]]]]


@torch.inference_mode()
def score_grid(
    model: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    prompt_for: PromptFor,
    labels: Sequence[str] = ("passkey",),
    progress: Progress | None = None,
) -> GridScores:
    """Correct answers and the mean answer NLL per label x length x depth, ``trials`` prompts
    per label and cell.

    Prompts are drawn in length, depth, trial, label order. The rotary state is reset before
    every length (dynamic NTK exact whatever ran before), and the chunked head is checked
    against the model's own loss on the first prompt. ``progress(tokens_done)`` is called after
    each prompt; the total is ``sum(lengths) * len(depths) * trials * len(labels)``.
    """
    if trials < 1:
        raise CtxextError(f"--trials must be at least 1, got {trials}")
    scores: GridScores = {
        n: ([[0] * len(depths) for _ in lengths], [[0.0] * len(depths) for _ in lengths])
        for n in labels
    }
    done, checked = 0, False
    with _eval_mode(model):
        for i, length in enumerate(lengths):
            reset_rotary_state(model)
            for j, depth in enumerate(depths):
                for _ in range(trials):
                    for label in labels:
                        prompt = prompt_for(length, depth, label)
                        if not checked:  # a short input: leaves a length-dependent rope as reset
                            _check_head(model, prompt.input_ids)
                            checked = True
                        ok, answer_nll = _passkey_score(model, prompt)
                        correct, nll = scores[label]
                        correct[i][j] += ok
                        nll[i][j] += answer_nll / trials
                        done += length
                        if progress is not None:
                            progress(done)
    return scores


def evaluate_passkey(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> PasskeyResult:
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
    return PasskeyResult(
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
