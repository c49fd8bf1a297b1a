"""In-domain retrieval: a key hidden at a depth of the context, asked for at the end, scored
teacher-forced on the key's tokens (correct iff every answer token is the argmax;
:mod:`ctxext.evaluate.scoring`).

The key/value forms are :mod:`ctxext.evaluate.needles` templates (code and prose, several name
shapes, assignment syntaxes and query forms), split into forms ctxext trains on and forms it
never does; the default scores the held-out ones hidden in real held-out documents, so a model
that memorised one form does not pass. ``text`` is the natural-language passkey of Mohtashami &
Jaggi in its own filler (:mod:`ctxext.evaluate.passkey`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ctxext.errors import CtxextError
from ctxext.evaluate.loss import Progress
from ctxext.evaluate.needles import (
    TEMPLATES,
    PasskeyPrompt,
    build_prompt,
    random_key,
    random_name,
    resolve_templates,
)
from ctxext.evaluate.passkey import build_passkey_prompt
from ctxext.evaluate.scoring import RetrievalResult, score_grid


def _code_filler(doc_ids: Sequence[Sequence[int]], need: int, rng: np.random.Generator):
    """A random document with at least ``need`` tokens (the longest one otherwise)."""
    long_enough = [i for i, ids in enumerate(doc_ids) if len(ids) >= need]
    if not long_enough:
        return max(doc_ids, key=len)
    return doc_ids[long_enough[int(rng.integers(0, len(long_enough)))]]


def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    *,
    template: str,
    doc_token_ids: Sequence[Sequence[int]] | None = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 5,
    seed: int = 0,
    progress: Progress | None = None,
) -> RetrievalResult:
    """Retrieval accuracy for every length x depth: ``trials`` random 5-digit keys per template
    (the rotary state reset before every length, as every task does).

    ``template``: ``text`` (the natural-language passkey in its own filler), or a selection of
    ``ctxext.needles`` templates hidden in ``doc_token_ids`` (``heldout``, ``train``, ``all``
    or comma-separated names). A cell's accuracy and answer NLL pool every selected template's
    trials; the per-template accuracies are kept in ``by_template``.
    """
    forms = None if template == "text" else resolve_templates(template)
    if forms is not None and not doc_token_ids:
        raise CtxextError("the retrieval templates need documents to hide the key in")
    names = ["text"] if forms is None else [t.name for t in forms]
    rng = np.random.default_rng(seed)

    def prompt_for(length: int, depth: float, label: str) -> PasskeyPrompt:
        key = random_key(rng)
        if forms is None:
            return build_passkey_prompt(tokenizer, length, depth, key)
        t = TEMPLATES[label]
        name = random_name(rng, t.shape)
        filler = _code_filler(doc_token_ids, length, rng)
        return build_prompt(tokenizer, filler, length, depth, key, name, t)

    scores = score_grid(model, lengths, depths, trials, prompt_for, names, progress)
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    pooled = [[0] * len(depths) for _ in lengths]
    nll = [[0.0] * len(depths) for _ in lengths]
    for i, j in cells:
        pooled[i][j] = sum(scores[n][0][i][j] for n in names)
        nll[i][j] = sum(scores[n][1][i][j] for n in names) / len(names)
    per = trials * len(names)
    return RetrievalResult(
        template=template,
        lengths=list(lengths),
        depths=list(depths),
        trials=per,
        accuracy=[[c / per for c in row] for row in pooled],
        correct=pooled,
        templates=names,
        by_template={n: [[c / trials for c in row] for row in scores[n][0]] for n in names},
        protocol=retrieval_protocol(template, names, seed),
        answer_nll=nll,
    )


def retrieval_protocol(template: str, names: Sequence[str], seed: int) -> dict[str, Any]:
    if template == "text":
        prompt = (
            "BOS + task + filler + 'The pass key is KEY...' at the depth + filler + question "
            "+ KEY (Mohtashami & Jaggi)"
        )
    else:
        forms = [TEMPLATES[n] for n in names]
        prompt = (
            "BOS + held-out documents cut at line boundaries + '\\nNEEDLE\\n' at the depth + "
            "documents + '\\nQUESTION KEY', per template: "
            + "; ".join(f"{t.name} ({t.split}): {t.needle!r} ... {t.question!r}" for t in forms)
        )
    return {
        "name": f"retrieval-{template}",
        "template": template,
        "templates": list(names),
        "split": sorted({TEMPLATES[n].split for n in names}) if template != "text" else [],
        "prompt": prompt + "; exactly `length` tokens including the answer",
        "depth": "fraction of the filler tokens placed before the needle",
        "scoring": "teacher-forced greedy: correct iff the argmax at every answer position is "
        "the answer's token; a cell pools every template's trials; answer_nll: mean over a "
        "cell's prompts of the answer tokens' summed NLL (nats)",
        "keys": f"uniform 5-digit integers (and random names of each template's shape), numpy "
        f"default_rng(seed={seed})",
    }
