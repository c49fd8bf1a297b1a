"""Synthetic long-range tasks: key/value facts hidden in real text, asked for at the end.

The training counterpart of the retrieval evaluation (:mod:`ctxext.context_use`), in the
spirit of RULER (Hsieh et al. 2024). Every sequence is exactly ``length`` tokens: BOS, real
filler text with the fact lines inserted at line boundaries, then the questions, each followed
by its answer (trained on with the ordinary next-token loss, so the model learns to copy a
value it saw earlier, from any distance up to ``length``). Three tasks (``TASKS``):

* ``retrieval``: one fact ``NAME = KEY`` at a uniform random depth; asked once.
* ``multikey``: ``keys`` facts with distinct names, each at its own uniform random depth;
  ``queries`` of them asked, in a random order (the others are distractors: the model must
  match the name, not copy the only number it saw).
* ``multihop`` (variable tracking): ``NAME_0 = KEY``, ``NAME_1 = NAME_0``, ...,
  ``NAME_h = NAME_{h-1}`` (``hops`` = h references), in that order at increasing uniform random
  depths; the last name is asked for, and its answer is KEY.

Depths are uniform over the filler, so facts land anywhere in the sequence: at training length
L the distance from a fact to its question is spread over 0 .. L. A fact goes at the line
start nearest its depth (a code line is never split); where the filler has no line start
within ``snap`` tokens (prose without line breaks), at the exact token.

How a fact and its question are written is a :class:`Template`. Until the retrieval template
registry exists, the one template is the evaluation's code template (``TOKEN_7F3A = 48213`` ...
``assert TOKEN_7F3A == 48213``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ctxext.config import TASK_SOURCES, TaskOptions
from ctxext.errors import CtxextError

__all__ = [
    "TASKS",
    "Draw",
    "NeedleSequence",
    "TokenCounter",
    "check_task_fits",
    "draw_multihop",
    "draw_multikey",
    "draw_task",
    "needle_ids",
    "task_sequence",
    "train_templates",
]

TASKS = TASK_SOURCES
Rng = np.random.Generator
#: Draws of a task's non-filler text measured by :func:`check_task_fits`.
_FIT_DRAWS = 64
#: Attempts at a draw whose facts and questions fit the length (see :func:`task_sequence`).
_REDRAWS = 32


class Template(Protocol):
    """How a fact and its question are written (the retrieval templates' interface)."""

    name: str
    joiner: str  # between the question and the answer

    def needle_text(self, name: str, key: str) -> str: ...

    def question_text(self, name: str) -> str: ...


@dataclass(frozen=True)
class _CodeTemplate:
    """The evaluation's code template: ``TOKEN_7F3A = 48213`` ... ``assert TOKEN_7F3A ==``."""

    name: str = "code"
    joiner: str = " "

    def needle_text(self, name: str, key: str) -> str:
        from ctxext.context_use import CODE_NEEDLE

        return CODE_NEEDLE.format(name=name, key=key)

    def question_text(self, name: str) -> str:
        from ctxext.context_use import CODE_QUESTION

        return CODE_QUESTION.format(name=name)


def train_templates() -> list[Template]:
    """The templates synthetic training sequences draw from (never the held-out ones)."""
    return [_CodeTemplate()]


def random_name(template: Template, rng: Rng) -> str:
    """A name in the shape ``template`` uses."""
    from ctxext.context_use import random_code_name

    return random_code_name(rng)


def random_key(rng: Rng) -> str:
    from ctxext.context_use import random_key as key

    return key(rng)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _line_starts(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    from ctxext.context_use import _line_starts as starts

    return starts(tokenizer, ids)


@dataclass
class NeedleSequence:
    """A built sequence: its ids, where each fact line starts, and each answer's token span."""

    input_ids: list[int]
    needles: list[int] = field(default_factory=list)  # token offset of each fact line
    answers: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per question
    values: list[str] = field(default_factory=list)  # each answer's text (joiner + key)


@dataclass
class Draw:
    """The random part of a task sequence: fact texts, (question, answer) texts, depths."""

    needles: list[str]
    asks: list[tuple[str, str]]
    depths: Sequence[float]


class TaskTooLong(CtxextError):
    """The facts and questions of a draw take more tokens than the sequence has."""


def _encoded(tokenizer: Any, draw: Draw) -> tuple[list[list[int]], list[list[int]]]:
    # Each question is encoded together with its answer, as the model reads them.
    lines = [_encode(tokenizer, text) for text in draw.needles]
    return lines, [_encode(tokenizer, q + a) for q, a in draw.asks]


def draw_tokens(tokenizer: Any, draw: Draw) -> int:
    """Tokens of a draw's facts and questions with their answers (everything but filler)."""
    lines, joint = _encoded(tokenizer, draw)
    return sum(map(len, lines)) + sum(map(len, joint))


def needle_ids(
    tokenizer: Any, filler: Sequence[int], length: int, draw: Draw, snap: int | None = None
) -> NeedleSequence:
    """``length`` tokens: BOS + filler with the draw's facts inserted + each question, answer.

    ``draw.depths[i]`` (a fraction of the filler) places fact i; facts keep their order (the
    i-th smallest cut gets fact i). A fact goes at the nearest line start, or at the exact
    token where that is more than ``snap`` tokens away (None: always a line start). The
    answer's span is what follows the question's own tokens in the joint encoding.
    """
    lines, joint = _encoded(tokenizer, draw)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    n_filler = length - len(bos) - sum(map(len, lines)) - sum(map(len, joint))
    if n_filler < 0:
        raise TaskTooLong(
            f"{len(lines)} facts and {len(joint)} questions take {length - n_filler - len(bos)} "
            f"tokens, more than the sequence length {length}"
        )
    if len(filler) < n_filler:
        raise CtxextError(f"the filler has {len(filler)} tokens, {n_filler} are needed")
    body = list(filler[:n_filler])
    starts = _line_starts(tokenizer, body)
    cuts = sorted(_cut(starts, d * len(body), snap) for d in draw.depths)
    out, placed, prev = list(bos), [], 0
    for cut, line in zip(cuts, lines, strict=True):
        out += body[prev:cut]
        placed.append(len(out))
        out += line
        prev = cut
    out += body[prev:]
    spans = []
    for (question, _), ids in zip(draw.asks, joint, strict=True):
        start = len(out) + _common_prefix(_encode(tokenizer, question), ids)
        out += ids
        spans.append((start, len(out)))
    return NeedleSequence(out, placed, spans, [a for _, a in draw.asks])


def _cut(starts: list[int], target: float, snap: int | None) -> int:
    nearest = min(starts, key=lambda b: abs(b - target))
    if snap is None or abs(nearest - target) <= snap:
        return nearest
    return int(target)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _distinct_names(templates: Sequence[Template], rng: Rng) -> list[str]:
    """One name per template (in its shape), none repeated (a repeat is drawn again)."""
    names: list[str] = []
    for t in templates:
        name = random_name(t, rng)
        while name in names:
            name = random_name(t, rng)
        names.append(name)
    return names


def _fact(template: Template, name: str, value: str) -> str:
    return "\n" + template.needle_text(name, value) + "\n"


def _ask(template: Template, name: str, value: str) -> tuple[str, str]:
    return "\n" + template.question_text(name), template.joiner + value


def draw_multikey(templates: Sequence[Template], rng: Rng, keys: int, queries: int) -> Draw:
    """``keys`` facts, each in a template drawn from ``templates`` (mixing forms within a
    sequence makes the model match the name, not the form), ``queries`` of them asked in a
    random order. The draws, in order: templates, names, keys, question order, depths."""
    chosen = [templates[int(i)] for i in rng.integers(0, len(templates), keys)]
    names = _distinct_names(chosen, rng)
    values = [random_key(rng) for _ in chosen]
    facts = [_fact(t, n, v) for t, n, v in zip(chosen, names, values, strict=True)]
    asks = [_ask(chosen[i], names[i], values[i]) for i in rng.permutation(keys)[:queries]]
    return Draw(facts, asks, rng.random(keys))


def draw_multihop(templates: Sequence[Template], rng: Rng, hops: int) -> Draw:
    """Variable tracking in one template drawn from ``templates``: ``hops`` + 1 distinct names
    chained from one key (NAME_0 = KEY, NAME_i = NAME_{i-1}), the last one asked; the facts in
    chain order at increasing depths."""
    template = templates[int(rng.integers(0, len(templates)))]
    names = _distinct_names([template] * (hops + 1), rng)
    key = random_key(rng)
    values = [key, *names[:-1]]
    facts = [_fact(template, n, v) for n, v in zip(names, values, strict=True)]
    return Draw(facts, [_ask(template, names[-1], key)], np.sort(rng.random(hops + 1)))


def draw_task(task: str, options: TaskOptions, rng: Rng) -> Draw:
    """The facts, questions and depths of one ``task`` sequence, in training templates."""
    templates = train_templates()
    if task == "multihop":
        return draw_multihop(templates, rng, options.hops)
    if task == "multikey":
        return draw_multikey(templates, rng, options.keys, options.queries)
    if task == "retrieval":
        return draw_multikey(templates, rng, 1, 1)
    raise ValueError(f"unknown task {task!r}")


def task_sequence(
    tokenizer: Any, task: str, options: TaskOptions, filler: Sequence[int], length: int, rng: Rng
) -> NeedleSequence:
    """One ``task`` sequence of ``length`` tokens (see the module docstring).

    A draw whose facts do not fit (rare: only when :func:`check_task_fits` passed narrowly)
    is drawn again from the same generator, so the sequence stays a function of ``rng``.
    """
    snap = max(1, length // 32)
    for _ in range(_REDRAWS):
        try:
            return needle_ids(tokenizer, filler, length, draw_task(task, options, rng), snap)
        except TaskTooLong:
            continue
    raise CtxextError(f"the {task} task does not fit in {length} tokens: {_shorter(task)}")


def _shorter(task: str) -> str:
    return {
        "multihop": "lower --task-hops or raise the training length",
        "multikey": "lower --task-keys/--task-queries or raise the training length",
    }.get(task, "raise the training length")


class TokenCounter:
    """Just enough of a tokenizer to count tokens, read from a model's tokenizer.json with the
    ``tokenizers`` library alone: the fit check runs before torch or transformers load. BOS
    is assumed present (a count one token high at worst)."""

    bos_token_id = 0

    def __init__(self, path: Any) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=False).ids}


def check_task_fits(tokenizer: Any, task: str, options: TaskOptions, length: int) -> None:
    """Refuse, in one line, a task whose facts and questions leave no room for filler at
    ``length`` tokens (the most tokens over 64 seeded draws, plus a 10% margin)."""
    rng = np.random.default_rng(0)
    worst = max(draw_tokens(tokenizer, draw_task(task, options, rng)) for _ in range(_FIT_DRAWS))
    need = (tokenizer.bos_token_id is not None) + worst + worst // 10 + 1  # + 1 filler token
    if need > length:
        detail = {
            "retrieval": "one fact and its question",
            "multikey": f"{options.keys} facts and {options.queries} questions",
            "multihop": f"a chain of {options.hops + 1} facts and its question",
        }[task]
        raise CtxextError(
            f"the {task} task source does not fit the training length {length}: {detail} "
            f"take about {need} tokens; {_shorter(task)}"
        )
