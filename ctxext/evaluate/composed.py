"""Composed training forms: retrieval syntax drawn at random from parts, for training only.

The training grid of :mod:`ctxext.evaluate.needles` has 288 forms. A small model trained on them
learns those forms: it retrieves 75% in them and 13% in the held-out syntax (issue 29's broad-grid
retrain). To learn the *skill* (find the name asked for, copy the number that followed it,
whatever the words around both) it has to see so many syntaxes that no single one can be
memorised. So each composed form is drawn afresh from parts: a prefix and a wrapper for the name,
a binding separator, a line end; a question opening and a question separator; for prose, a lead,
a verb and an end. About 10^6 code and 10^4 prose combinations, and the question's words are
drawn independently of the binding's, as in the held-out forms.

The split stays by construction: no part contains a word or a piece of syntax of a held-out form
(``config.set``, ``expect(``, ``#define``, ``Remember``, ``pin``, ...);
tests/test_evaluate_composed.py checks it on thousands of drawn forms. Composed forms are never
scored: ``ctxext eval`` scores the held-out forms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctxext.evaluate.needles import NeedleTemplate

if TYPE_CHECKING:
    import numpy as np

__all__ = ["composed_form"]

# Code. How the name is written where it is bound and where it is asked for (the reference).
_WRAPPERS = [
    ("{name}", "{name}"),
    ("self.{name}", "self.{name}"),
    ("opts.{name}", "opts.{name}"),
    ("env.{name}", "env.{name}"),
    ("state.{name}", "state.{name}"),
    ('opts["{name}"]', 'opts["{name}"]'),
    ("var {name}", "{name}"),
    ("val {name}", "{name}"),
    ("auto {name}", "{name}"),
    ("final int {name}", "{name}"),
    ("${name}", "${name}"),
    ("@{name}", "@{name}"),
    ("{name}", "Settings.{name}"),
]
_SEPARATORS = [" = ", "=", ": ", " := ", " <- ", " -> ", " => ", " is ", " ", ", ", " += "]
_ENDS = ["", ";", ",", " # fixed", " // default", " end", ")"]
_INDENTS = ["", "    ", "        ", "\t"]
# Question openings and separators (what the key follows).
_OPENINGS = [
    "assert ",
    "if ",
    "while ",
    "check(",
    "print(",
    "yield ",
    "return ",
    "out = ",
    "want(",
    "verify(",
    "require(",
    "ensure ",
    "when ",
    "# see ",
    "case ",
]
_QUESTION_SEPARATORS = [" ==", " !=", " <", " >", " >=", " =", ":", " is", ",", " ->", " =>"]
_CLOSERS = ["", ")"]

# Prose: statement and question drawn independently, so the question's words are not the
# statement's (the held-out prose forms ask in other words than they state).
_LEADS = ["", "Note: ", "Today ", "By default ", "In this file ", "As agreed, ", "Also, "]
_VERBS = [
    "is",
    "equals",
    "was given",
    "got",
    "became",
    "takes",
    "has",
    "is now",
    "shows",
    "counts",
    "stays at",
    "came to",
    "is fixed at",
    "was changed to",
]
_PROSE_ENDS = [".", "", " today.", " for now.", " in this run.", " (see above)."]
_QUESTION_LEADS = ["", "So ", "Again, ", "Recall that ", "As said, ", "Check: ", "Thus "]
_ASKS = [
    ("# How much is {name}? It is", " "),
    ("# Which value has {name}? It has", " "),
    ("# Tell me {name}:", " "),
    ("# And {name}? Answer:", " "),
    ("# The number for {name}, please:", " "),
]


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(0, len(options)))]


def _code_form(rng: np.random.Generator) -> NeedleTemplate:
    bind, ref = _pick(rng, _WRAPPERS)
    needle = _pick(rng, _INDENTS) + bind + _pick(rng, _SEPARATORS) + "{key}" + _pick(rng, _ENDS)
    opening, closer = _pick(rng, _OPENINGS), _pick(rng, _CLOSERS)
    separator = _pick(rng, _QUESTION_SEPARATORS)
    # A call opening closes before its separator half the time: `check(x) ==` or `check(x ==`.
    question = opening + ref + (closer if opening.endswith("(") else "") + separator
    return NeedleTemplate(
        "composed-code", "train", _pick(rng, ["upper", "snake", "camel"]), needle, question
    )


def _prose_form(rng: np.random.Generator) -> NeedleTemplate:
    needle = (
        "# "
        + _pick(rng, _LEADS)
        + "{name} "
        + _pick(rng, _VERBS)
        + " {key}"
        + _pick(rng, _PROSE_ENDS)
    )
    if rng.random() < 0.5:
        question, joiner = _pick(rng, _ASKS)
    else:
        question, joiner = "# " + _pick(rng, _QUESTION_LEADS) + "{name} " + _pick(rng, _VERBS), " "
    return NeedleTemplate(
        "composed-prose",
        "train",
        _pick(rng, ["title", "snake"]),
        needle,
        question,
        joiner,
        family="prose",
    )


def composed_form(rng: np.random.Generator, prose_share: float = 0.25) -> NeedleTemplate:
    """A training form drawn from parts (prose with probability ``prose_share``, else code)."""
    return _prose_form(rng) if rng.random() < prose_share else _code_form(rng)
