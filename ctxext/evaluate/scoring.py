"""Scoring a retrieval answer: teacher-forced greedy decoding of the key's tokens, over a grid
of lengths x depths x trials, and the result type of the passkey and retrieval tasks."""

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
    check_head,
    eval_mode,
    final_hidden,
    lm_head,
    reset_rotary_state,
)
from ctxext.evaluate.needles import PasskeyPrompt

#: Retrieval accuracy at every depth needed for a length to count as read.
RETRIEVAL_THRESHOLD = 0.9


@torch.inference_mode()
def answer_score(model: Any, prompt: PasskeyPrompt) -> tuple[bool, float]:
    """Teacher-forced greedy check and the answer's NLL (nats, summed over its tokens).

    Correct iff the argmax at every answer position equals the answer token: exactly "greedy
    decoding's first tokens are the answer's tokens" (by induction on the answer's tokens), at
    the cost of one forward pass and a head over len(answer) positions.
    """
    ids = torch.tensor([prompt.input_ids])
    hidden = final_hidden(model, ids, None)
    rows = hidden[prompt.answer_start - 1 : len(prompt.input_ids) - 1]
    logits = lm_head(model)(rows)
    target = torch.tensor(prompt.answer_ids, device=logits.device)
    nll = F.cross_entropy(logits, target, reduction="sum").double().item()
    return logits.argmax(dim=-1).cpu().tolist() == prompt.answer_ids, nll


def answer_correct(model: Any, prompt: PasskeyPrompt) -> bool:
    """Teacher-forced greedy check (see :func:`answer_score`)."""
    return answer_score(model, prompt)[0]


@dataclass
class RetrievalResult:
    """Accuracy per length x depth (``accuracy[i][j]``: lengths[i] at depths[j]), of the
    passkey task (``template`` None) or of retrieval in templates."""

    lengths: list[int]
    depths: list[float]
    trials: int
    accuracy: list[list[float]]
    correct: list[list[int]]
    template: str | None = None
    """The ``--retrieval-template`` selection; None for the passkey task."""
    templates: list[str] = field(default_factory=list)
    """The templates pooled in each cell (``text`` for the passkey)."""
    by_template: dict[str, list[list[float]]] = field(default_factory=dict)
    """Accuracy per template, length and depth."""
    protocol: dict[str, Any] = field(default_factory=dict)
    answer_nll: list[list[float]] = field(default_factory=list)
    """Mean over trials of the answer tokens' summed NLL (nats), per length x depth."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.template is None:  # the passkey task: no templates
            for key in ("template", "templates", "by_template"):
                del d[key]
        else:
            d = {"template": d.pop("template"), **d}
        d["mean_by_length"] = {
            str(n): float(np.mean(row)) for n, row in zip(self.lengths, self.accuracy, strict=True)
        }
        return d

    def retrieves_at(self, length: int, threshold: float = RETRIEVAL_THRESHOLD) -> bool:
        row = self.accuracy[self.lengths.index(length)]
        return all(a >= threshold for a in row)


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
    with eval_mode(model):
        for i, length in enumerate(lengths):
            reset_rotary_state(model)
            for j, depth in enumerate(depths):
                for _ in range(trials):
                    for label in labels:
                        prompt = prompt_for(length, depth, label)
                        if not checked:  # a short input: leaves a length-dependent rope as reset
                            check_head(model, prompt.input_ids)
                            checked = True
                        ok, answer_nll = answer_score(model, prompt)
                        correct, nll = scores[label]
                        correct[i][j] += ok
                        nll[i][j] += answer_nll / trials
                        done += length
                        if progress is not None:
                            progress(done)
    return scores
