"""Synthetic long-range tasks for fine-tuning: key/value facts hidden in real text, asked for
at the end, in the *training* templates of :mod:`ctxext.evaluate.needles` only.

The training counterpart of the retrieval evaluation, in the spirit of RULER (Hsieh et al.
2024). Every sequence is exactly ``length`` tokens: BOS, real filler text with the fact lines
inserted, then the questions, each followed by its answer (trained on with the ordinary
next-token loss, so the model learns to find a name and copy the value it saw with it, from
any distance up to ``length``). Three tasks (``TASKS``):

* ``retrieval``: one fact at a uniform random depth, asked once (RULER's single NIAH).
* ``multikey``: ``keys`` facts with distinct names, each in its own training template at its
  own uniform random depth; ``queries`` of them asked, in a random order (the others are
  distractors: the model must match the name, not copy the only number it saw; RULER's
  multi-key / multi-query NIAH).
* ``multihop`` (RULER's variable tracking): ``NAME_0 = KEY``, ``NAME_1 = NAME_0``, ...,
  ``NAME_h = NAME_{h-1}`` (``hops`` = h references) in one template, in chain order at
  increasing uniform random depths; the last name is asked for, and its answer is KEY.

Depths are uniform over the filler, so facts land anywhere in the sequence: the distance from
a fact to its question is spread over 0 .. ``length``. A fact goes at the line start nearest its
depth, or mid-line where none is within 5% of the filler (``needles.place_lines``). Questions
and answers are encoded as the evaluation encodes them (``needles.question_and_answer``).

Nothing here imports torch: :func:`check_task_fits` runs with :class:`TokenCounter` before
anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxext.config import TASK_SOURCES, TaskOptions
from ctxext.errors import CtxextError
from ctxext.evaluate.composed import composed_form
from ctxext.evaluate.needles import (
    NeedleTemplate,
    distinct_names,
    encode,
    place_lines,
    question_and_answer,
    random_key,
    templates_of,
)

__all__ = [
    "TASKS",
    "Draw",
    "NeedleSequence",
    "TokenCounter",
    "check_mix_tasks_fit",
    "check_task_fits",
    "draw_multihop",
    "draw_multikey",
    "draw_task",
    "episode_lengths",
    "needle_ids",
    "packed_episodes",
    "task_sequence",
    "train_templates",
]

TASKS = TASK_SOURCES
Rng = np.random.Generator
#: (template, name, value) of one fact, or of one question and the value it expects.
Fact = tuple[NeedleTemplate, str, str]
#: Draws of a task's non-filler text measured by :func:`check_task_fits`.
_FIT_DRAWS = 64
#: Attempts at a draw whose facts and questions fit the length (see :func:`task_sequence`).
_REDRAWS = 32


def train_templates() -> list[NeedleTemplate]:
    """The templates synthetic training sequences draw from: the training split, never the
    held-out templates `ctxext eval` scores by default."""
    return templates_of("train")


@dataclass
class Draw:
    """The random part of a task sequence: the facts, the questions, the facts' depths."""

    facts: list[Fact]
    asks: list[Fact]
    depths: Sequence[float]


@dataclass
class NeedleSequence:
    """A built sequence: its ids, where each fact line starts, and each answer's token span."""

    input_ids: list[int]
    needles: list[int] = field(default_factory=list)  # token offset of each fact line
    answers: list[tuple[int, int]] = field(default_factory=list)  # [start, end) per question
    values: list[str] = field(default_factory=list)  # the value each question expects


class TaskTooLong(CtxextError):
    """The facts and questions of a draw take more tokens than the sequence has."""


def _encoded(tokenizer: Any, draw: Draw) -> tuple[list[list[int]], list[tuple[list, list]]]:
    lines = [encode(tokenizer, "\n" + t.needle_text(n, v) + "\n") for t, n, v in draw.facts]
    asks = [question_and_answer(tokenizer, t, n, v) for t, n, v in draw.asks]
    return lines, asks


def draw_tokens(tokenizer: Any, draw: Draw) -> int:
    """Tokens of a draw's facts, questions and answers (everything but BOS and filler)."""
    lines, asks = _encoded(tokenizer, draw)
    return sum(map(len, lines)) + sum(len(q) + len(a) for q, a in asks)


def needle_ids(tokenizer: Any, filler: Sequence[int], length: int, draw: Draw) -> NeedleSequence:
    """``length`` tokens: BOS + filler with the draw's facts placed at their depths (fractions
    of the filler) + each question and its answer."""
    lines, asks = _encoded(tokenizer, draw)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    n_filler = length - len(bos) - draw_tokens(tokenizer, draw)
    if n_filler < 0:
        raise TaskTooLong(
            f"{len(lines)} facts and {len(asks)} questions take {length - n_filler - len(bos)} "
            f"tokens, more than the sequence length {length}"
        )
    if len(filler) < n_filler:
        raise CtxextError(f"the filler has {len(filler)} tokens, {n_filler} are needed")
    body, at = place_lines(tokenizer, list(filler[:n_filler]), lines, list(draw.depths))
    out, spans = bos + body, []
    for question, answer in asks:
        out += question
        spans.append((len(out), len(out) + len(answer)))
        out += answer
    return NeedleSequence(out, [len(bos) + p for p in at], spans, [v for _, _, v in draw.asks])


def _compose(chosen: list[NeedleTemplate], rng: Rng, composed: float) -> list[NeedleTemplate]:
    """Each template replaced, with probability ``composed``, by a form drawn from parts
    (``ctxext.evaluate.composed``). 0 draws nothing, so grid-only sequences stay as they were."""
    if not composed:
        return chosen
    return [composed_form(rng) if rng.random() < composed else t for t in chosen]


def draw_multikey(
    templates: Sequence[NeedleTemplate], rng: Rng, keys: int, queries: int, composed: float = 0.0
) -> Draw:
    """``keys`` facts, each in a template drawn from ``templates`` (mixing forms within a
    sequence makes the model match the name, not the form) or, with probability ``composed``,
    composed from parts; ``queries`` of them asked in a random order. The draws, in order:
    templates, names, values, question order, depths."""
    chosen = [templates[int(i)] for i in rng.integers(0, len(templates), keys)]
    chosen = _compose(chosen, rng, composed)
    names = distinct_names(chosen, rng)
    facts = [(t, n, random_key(rng)) for t, n in zip(chosen, names, strict=True)]
    asks = [facts[i] for i in rng.permutation(keys)[:queries]]
    return Draw(facts, asks, rng.random(keys))


def draw_multihop(
    templates: Sequence[NeedleTemplate], rng: Rng, hops: int, composed: float = 0.0
) -> Draw:
    """Variable tracking in one template drawn from ``templates`` (or, with probability
    ``composed``, composed from parts): ``hops`` + 1 distinct names chained from one key
    (NAME_0 = KEY, NAME_i = NAME_{i-1}), the last one asked; the facts in chain order at
    increasing depths."""
    (template,) = _compose([templates[int(rng.integers(0, len(templates)))]], rng, composed)
    names = distinct_names([template] * (hops + 1), rng)
    key = random_key(rng)
    facts = [(template, n, v) for n, v in zip(names, [key, *names[:-1]], strict=True)]
    return Draw(facts, [(template, names[-1], key)], np.sort(rng.random(hops + 1)))


def draw_task(task: str, options: TaskOptions, rng: Rng) -> Draw:
    """The facts, questions and depths of one ``task`` sequence, in training templates."""
    templates, composed = train_templates(), options.composed
    if task == "multihop":
        return draw_multihop(templates, rng, options.hops, composed)
    if task == "multikey":
        return draw_multikey(templates, rng, options.keys, options.queries, composed)
    if task == "retrieval":
        return draw_multikey(templates, rng, 1, 1, composed)
    raise ValueError(f"unknown task {task!r}")


def task_sequence(
    tokenizer: Any, task: str, options: TaskOptions, filler: Sequence[int], length: int, rng: Rng
) -> NeedleSequence:
    """One ``task`` sequence of ``length`` tokens (see the module docstring).

    A draw whose facts do not fit (rare: only when :func:`check_task_fits` passed narrowly)
    is drawn again from the same generator, so the sequence stays a function of ``rng``.
    """
    for _ in range(_REDRAWS):
        try:
            return needle_ids(tokenizer, filler, length, draw_task(task, options, rng))
        except TaskTooLong:
            continue
    raise CtxextError(f"the {task} task does not fit in {length} tokens: {_shorter(task)}")


def episode_lengths(total: int, low: int, rng: Rng) -> list[int]:
    """Lengths of the episodes one packed task sample of ``total`` tokens holds: each drawn
    log-uniform between ``low`` and what is left, so every scale from ``low`` to ``total``
    is trained about equally often (a uniform draw would rarely train short distances); an
    episode that would leave less than ``low`` takes the rest. Sums to ``total``."""
    out, left = [], total
    while left >= 2 * low:
        n = min(left, round(float(np.exp(rng.uniform(np.log(low), np.log(left))))))
        if left - n < low:
            n = left
        out.append(n)
        left -= n
    if left:
        out.append(left)
    return out


@dataclass
class PackedEpisodes:
    """One training sample of independent task episodes packed end to end."""

    input_ids: list[int]
    labels: list[int]  # -100 at each episode's first token (BOS): not predicted across episodes
    position_ids: list[int]  # from 0 in each episode
    episodes: list[NeedleSequence]


def packed_episodes(
    tokenizer: Any,
    task: str,
    options: TaskOptions,
    filler: Sequence[int],
    length: int,
    rng: Rng,
) -> PackedEpisodes:
    """``length`` tokens of ``task`` episodes of :func:`episode_lengths` (``options.min_length``
    .. ``length``), each a :func:`task_sequence` with its own BOS, its filler the next slice of
    ``filler``. Position ids restart at 0 in each; no token attends across an episode because
    training passes a block mask built from the episodes (:mod:`ctxext.finetune.episodes`)."""
    low = options.min_length or length
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    episodes = []
    for n in episode_lengths(length, low, rng):
        start = len(ids)
        seq = task_sequence(tokenizer, task, options, filler[start : start + n], n, rng)
        episodes.append(seq)
        ids += seq.input_ids
        labels += [-100, *seq.input_ids[1:]] if start else seq.input_ids
        positions += range(n)
    return PackedEpisodes(ids, labels, positions, episodes)


def _shorter(task: str, episode: bool = False) -> str:
    longer = "raise --task-min-length" if episode else "raise the training length"
    return {
        "multihop": f"lower --task-hops or {longer}",
        "multikey": f"lower --task-keys/--task-queries or {longer}",
    }.get(task, longer)


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


def check_mix_tasks_fit(
    tokenizer: Any, tasks: Sequence[str], options: TaskOptions, length: int
) -> None:
    """Refuse, in one line, task sources that cannot fit the training ``length``, or with
    ``options.min_length`` its shortest episode (which must not exceed ``length``)."""
    low = options.min_length
    if low is not None and low > length:
        raise CtxextError(
            f"--task-min-length ({low}) exceeds the training length {length}: lower it"
        )
    for task in tasks:
        check_task_fits(tokenizer, task, options, low or length, episode=low is not None)


def check_task_fits(
    tokenizer: Any, task: str, options: TaskOptions, length: int, *, episode: bool = False
) -> None:
    """Refuse, in one line, a task whose facts and questions leave no room for filler at
    ``length`` tokens (the most tokens over 64 seeded draws, plus a 10% margin). ``episode``:
    ``length`` is the shortest packed episode (--task-min-length), not the training length."""
    rng = np.random.default_rng(0)
    worst = max(draw_tokens(tokenizer, draw_task(task, options, rng)) for _ in range(_FIT_DRAWS))
    need = (tokenizer.bos_token_id is not None) + worst + worst // 10 + 1  # + 1 filler token
    if need > length:
        detail = {
            "retrieval": "one fact and its question",
            "multikey": f"{options.keys} facts and {options.queries} questions",
            "multihop": f"a chain of {options.hops + 1} facts and its question",
        }[task]
        where = f"--task-min-length {length}" if episode else f"the training length {length}"
        raise CtxextError(
            f"the {task} task source does not fit {where}: {detail} take about {need} tokens; "
            + _shorter(task, episode)
        )
