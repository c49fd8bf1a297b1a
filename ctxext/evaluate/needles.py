"""Key/value retrieval templates: several surface forms, split into training and held-out ones.

A model that retrieves ``TOKEN_7F3A = 48213`` when asked ``assert TOKEN_7F3A ==`` may only have
memorised that one template. Retrieval measures a *skill* when the model is scored on templates
it never saw in training. So every template here has a split:

* ``train``: the forms the bundled model (``ctxext.bundled_train``) and the fine-tune's synthetic
  retrieval source (``ctxext finetune --mix``) train on;
* ``heldout``: forms no ctxext training data contains. ``ctxext eval --task retrieval`` scores
  these by default.

A template varies four things: the name's shape (``TOKEN_7F3A``, ``max_retry_3a``,
``maxRetry3A``, ``Falcon Ridge 42``), the binding syntax (``=``, ``: int =``, ``self.x =``,
``export x=``, ...), the question syntax (``assert x ==``, ``while x <``, a call, ...) and the
register (code or prose). The split is by construction: bindings, questions and prose phrasings
each have training and held-out members, and every held-out form is built from held-out members
only, so no held-out needle line or question line occurs in training (the name's shape is a
separate axis, the same shapes on both sides). The held-out forms come in three *families*,
reported and judged separately: ``code-binding`` (a new way to bind the value),
``code-question`` (a new way to ask for it) and ``prose`` (new verbs and phrasings). Keys are
random 5-digit numbers, as in the passkey test of Mohtashami & Jaggi.

Every prompt is BOS + filler (real held-out text, cut at line boundaries) with the needle line at
a depth + the question + the key, exactly ``length`` tokens; the key's tokens are scored
teacher-forced (``ctxext.evaluate.passkey``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ctxext.errors import CtxextError
from ctxext.evaluate.names import NameShape, random_key, random_name

if TYPE_CHECKING:  # numpy only for annotations: the config layer imports this module
    import numpy as np

__all__ = [
    "HELDOUT_FAMILIES",
    "TEMPLATES",
    "NeedleTemplate",
    "PasskeyPrompt",
    "build_prompt",
    "distinct_names",
    "families_of",
    "line_starts",
    "multi_needle_ids",
    "place_lines",
    "random_key",
    "random_name",
    "resolve_templates",
    "templates_of",
]

Split = Literal["train", "heldout"]
#: A form's family: held out ``code-binding`` / ``code-question`` / ``prose``; training ``code`` /
#: ``prose``. Retrieval is reported, and the effective length judged, per family.
Family = Literal["code-binding", "code-question", "prose", "code"]


@dataclass(frozen=True)
class NeedleTemplate:
    """One surface form of a key/value pair and of the question that asks for it."""

    name: str
    split: Split
    shape: NameShape
    needle: str
    """The line holding the value: ``{name}`` and ``{key}`` are filled in."""
    question: str
    """The line asking for it, ending just before the key."""
    joiner: str = " "
    """What separates the question from the key (nothing after a keyword argument's ``=``)."""
    family: Family = "code"
    """What the form tests (held out: ``code-binding``, ``code-question``, ``prose``)."""

    @property
    def register(self) -> Literal["code", "prose"]:
        """Code or prose: the prose family is prose, every other family code."""
        return "prose" if self.family == "prose" else "code"

    def needle_text(self, name: str, key: str) -> str:
        return self.needle.format(name=name, key=key)

    def question_text(self, name: str) -> str:
        return self.question.format(name=name)


# The split is by construction, on three axes at once: the binding syntaxes, the question
# syntaxes and the prose phrasings each have a training set and a held-out set, and a held-out
# form is made only of held-out parts, so no held-out form shares a needle line or a question
# line with any training form (tests/test_evaluate_needles.py checks it over the whole grid).
# A held-out form that reused a training line would test the name's style, not the syntax: the
# earlier held-out `camel-attribute` used exactly the lines of `attr-if-upper` and retrieved
# 100% where forms with new lines retrieved 0-27% at 2048 (issue 29). The name's style (upper,
# snake, camel, title) is a separate axis, drawn from the same shapes on both sides.
#
# Training (the grid the bundled model and `ctxext finetune --mix` train on), code: every
# binding x query x name shape; the binding and the reference a query uses for it.
_ASSIGN = {
    "plain": ("{name} = {key}", "{name}"),
    "annotated": ("{name}: int = {key}", "{name}"),
    "attr": ("self.{name} = {key}", "self.{name}"),
    "dict": ('cfg["{name}"] = {key}', 'cfg["{name}"]'),
    "keyword": ("    {name}={key},", "{name}"),
    "walrus": ("if ({name} := {key}):", "{name}"),
    "shell": ("export {name}={key}", "{name}"),
    "yaml": ("{name}: {key}", "{name}"),
    "json": ('"{name}": {key},', 'data["{name}"]'),
}
# Code queries: (line before the key, what joins it to the key).
_QUERY = {
    "assert": ("assert {ref} ==", " "),
    "if": ("if {ref} !=", " "),
    "return": ("return {ref} ==", " "),
    "call": ("setup({ref}=", ""),
    "while": ("while {ref} <", " "),
    "elif": ("elif {ref} ==", " "),
    "print": ("print({ref})  # prints", " "),
    "compare": ("ok = {ref} ==", " "),
}
_CODE_SHAPES: tuple[NameShape, ...] = ("upper", "snake", "camel")
# Training prose: every statement x question x prose name shape. Varied verbs, and questions
# whose last words before the answer are not the name ("Which number does X hold? It holds"),
# so the model learns to find the name wherever the question puts it, not to copy the number
# after a fixed phrase.
_PROSE_STATEMENTS = {
    "value": "# The value of {name} is {key}.",
    "set": "# Note that {name} is set to {key}.",
    "number": "# {name} has the number {key}.",
    "stored": "# {name} is stored as {key} for now.",
    "gave": "# We gave {name} the number {key} at startup.",
    "holds": "# After the update, {name} holds {key}.",
}
_PROSE_QUESTIONS = {
    "value": "# The value of {name} is",
    "set": "# So {name} is set to",
    "number": "# The number of {name} is",
    "which": "# Which number does {name} hold? It holds",
    "asked": "# If asked about {name}, answer",
    "back": "# Looking back at {name}, we find",
}
_PROSE_SHAPES: tuple[NameShape, ...] = ("title", "snake")

# Held out, in three families, each form new in both its lines: (name, shape, needle, question,
# joiner). Code binding: bindings no training form uses, asked with a training query keyword on
# the new reference. Code question: query syntaxes no training form uses (on new bindings too,
# since every training binding's line is a training line). Prose: verbs and phrasings no
# training statement or question uses ("Remember", "code for", "recorded", "log", "pin").
_HELDOUT: dict[Family, list[tuple[str, NameShape, str, str, str]]] = {
    "code-binding": [
        (
            "setter-get",
            "snake",
            'config.set("{name}", {key})',
            'assert config.get("{name}") ==',
            " ",
        ),
        ("params-dict", "camel", "params = dict({name}={key})", 'if params["{name}"] !=', " "),
        (
            "setattr-getattr",
            "upper",
            'setattr(self, "{name}", {key})',
            'return getattr(self, "{name}") ==',
            " ",
        ),
    ],
    "code-question": [
        ("const-expect", "camel", "const {name} = {key};", "expect({name}).toBe(", ""),
        ("let-assert-equal", "snake", "let {name} = {key};", "self.assertEqual({name},", " "),
        ("define-static-assert", "upper", "#define {name} {key}", "static_assert({name} ==", " "),
    ],
    "prose": [
        (
            "prose-code",
            "title",
            "# Remember: the code for {name} is {key}.",
            "# What is the code for {name}? It is",
            " ",
        ),
        (
            "prose-recorded",
            "snake",
            "# {name} was recorded as {key} in the log.",
            "# In the log, the entry for {name} reads",
            " ",
        ),
        (
            "prose-pin",
            "title",
            "# The pin of {name} ends the list: {key}.",
            "# Pin of {name}:",
            " ",
        ),
    ],
}


def _grid() -> list[NeedleTemplate]:
    """The held-out forms, then the training grid."""
    held = [
        NeedleTemplate(
            name,
            "heldout",
            shape,
            needle,
            question,
            joiner,
            family=fam,
        )
        for fam, forms in _HELDOUT.items()
        for name, shape, needle, question, joiner in forms
    ]
    train = []
    for (a, (needle, ref)), (q, (query, joiner)) in (
        (x, y) for x in _ASSIGN.items() for y in _QUERY.items()
    ):
        for shape in _CODE_SHAPES:
            train.append(
                NeedleTemplate(
                    f"{a}-{q}-{shape}",
                    "train",
                    shape,
                    needle,
                    query.format(ref=ref),
                    joiner,
                    family="code",
                )
            )
    for s, statement in _PROSE_STATEMENTS.items():
        for q, question in _PROSE_QUESTIONS.items():
            for shape in _PROSE_SHAPES:
                train.append(
                    NeedleTemplate(
                        f"prose-{s}-{q}-{shape}",
                        "train",
                        shape,
                        statement,
                        question,
                        family="prose",
                    )
                )
    return held + train


#: Every template: 9 held-out forms (3 families of 3) and 288 training forms (216 code, 72 prose).
TEMPLATES: dict[str, NeedleTemplate] = {t.name: t for t in _grid()}

#: The held-out families, in report order.
HELDOUT_FAMILIES: tuple[Family, ...] = tuple(_HELDOUT)


def families_of(names: Sequence[str]) -> dict[str, list[str]]:
    """Template names grouped by family (held-out families first, in registry order)."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(TEMPLATES[n].family, []).append(n)
    return out


#: Selections ``--retrieval-template`` accepts besides single template names.
_GROUPS = ("heldout", "train", "all")


def templates_of(split: Split | Literal["all"]) -> list[NeedleTemplate]:
    """The templates of one split (or all), in registry order."""
    return [t for t in TEMPLATES.values() if split == "all" or t.split == split]


def resolve_templates(selection: str) -> list[NeedleTemplate]:
    """``heldout`` | ``train`` | ``all`` | comma-separated template names -> templates.

    ``code`` is the original single template (``TOKEN_7F3A = 48213`` ... ``assert TOKEN_7F3A
    == 48213``), now ``plain-assert-upper``.
    """
    if selection in _GROUPS:
        return templates_of(selection)  # type: ignore[arg-type]
    names = [n.strip() for n in selection.split(",")]
    names = ["plain-assert-upper" if n == "code" else n for n in names]
    unknown = [n for n in names if n not in TEMPLATES]
    if unknown:
        raise CtxextError(
            f"unknown retrieval template {unknown[0]!r}; use heldout, train, all, text or "
            f"template names: held out {', '.join(t.name for t in templates_of('heldout'))}; "
            "training forms BINDING-QUERY-SHAPE such as plain-assert-upper (ctxext/evaluate/needles.py)"
        )
    return [TEMPLATES[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# Building prompts


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def line_starts(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Token offsets after a line break (a token ending in a newline, maybe plus indentation:
    byte-level BPE merges ``"\\n    "`` into one token). 0 is always one."""
    starts = [0]
    for i, tid in enumerate(ids):
        if tokenizer.decode([tid]).rstrip(" \t").endswith("\n"):
            starts.append(i + 1)
    return starts


@dataclass(frozen=True)
class PasskeyPrompt:
    """One retrieval trial: ``input_ids`` (exactly ``length`` tokens, answer included).

    ``input_ids[answer_start:]`` are the answer's tokens; the model must predict each of them
    greedily from the tokens before it.
    """

    input_ids: list[int]
    answer_start: int
    key: str

    @property
    def answer_ids(self) -> list[int]:
        return self.input_ids[self.answer_start :]


def question_and_answer(
    tokenizer: Any, template: NeedleTemplate, name: str, key: str
) -> tuple[list[int], list[int]]:
    """The question's tokens and the key's tokens as they follow it.

    Encoded jointly so the key's tokens are the ones the text would really have; when the
    tokenizer merges across the join, the key is scored as encoded on its own.
    """
    q_text = "\n" + template.question_text(name)
    question = encode(tokenizer, q_text)
    joint = encode(tokenizer, q_text + template.joiner + key)
    if joint[: len(question)] == question and len(joint) > len(question):
        return question, joint[len(question) :]
    return question, encode(tokenizer, template.joiner + key)


def _cut(starts: list[int], target: float, slack: float) -> int:
    """The line boundary nearest ``target``; the token position itself when none is within
    ``slack`` tokens (text without line breaks, e.g. one long paragraph)."""
    best = min(starts, key=lambda b: abs(b - target))
    return best if abs(best - target) <= slack else round(target)


def place_lines(
    tokenizer: Any, body: list[int], lines: list[list[int]], depths: Sequence[float]
) -> tuple[list[int], list[int]]:
    """Insert each line at the line boundary of ``body`` nearest its depth (fraction of body),
    or mid-line where no boundary is within 5% of the body. Returns the ids and where each
    line starts in them (lines at the same cut keep their order)."""
    starts = line_starts(tokenizer, body)
    cuts = [_cut(starts, d * len(body), 0.05 * len(body)) for d in depths]
    out, prev, at = [], 0, [0] * len(lines)
    for cut, i in sorted(zip(cuts, range(len(lines)), strict=True), key=lambda x: x[0]):
        out += body[prev:cut]
        at[i] = len(out)
        out += lines[i]
        prev = cut
    return out + body[prev:], at


def distinct_names(templates: Sequence[NeedleTemplate], rng: np.random.Generator) -> list[str]:
    """A name per template, in its shape; none repeated (a repeat would ask for one of two
    values, so it is drawn again)."""
    names: list[str] = []
    for t in templates:
        name = random_name(rng, t.shape)
        while name in names:
            name = random_name(rng, t.shape)
        names.append(name)
    return names


def build_prompt(
    tokenizer: Any,
    filler_ids: Sequence[int],
    length: int,
    depth: float,
    key: str,
    name: str,
    template: NeedleTemplate | None = None,
) -> PasskeyPrompt:
    """BOS + filler + needle line (at ``depth``) + filler + question + key: ``length`` tokens.

    The filler is real held-out text (``filler_ids``, at least as long as needed) cut to fill
    exactly ``length`` tokens; the needle goes at the line boundary nearest the depth, so it
    never splits a line. ``template`` defaults to ``plain-assert-upper`` (``TOKEN_7F3A = 48213``
    ... ``assert TOKEN_7F3A == 48213``).
    """
    template = template or TEMPLATES["plain-assert-upper"]
    if not 0.0 <= depth <= 1.0:
        raise CtxextError(f"retrieval depth {depth} is outside [0, 1]; use fractions like 0.5")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    needle = encode(tokenizer, "\n" + template.needle_text(name, key) + "\n")
    question, answer = question_and_answer(tokenizer, template, name, key)
    n_filler = length - len(bos) - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise CtxextError(
            f"retrieval length {length} is too short for the {template.name} prompt; use "
            "longer lengths"
        )
    if len(filler_ids) < n_filler:
        raise CtxextError(
            f"the retrieval filler has {len(filler_ids)} tokens, {n_filler} are needed at "
            f"length {length}; use longer data or shorter lengths"
        )
    body, _ = place_lines(tokenizer, list(filler_ids[:n_filler]), [needle], [depth])
    ids = bos + body + question + answer
    return PasskeyPrompt(input_ids=ids, answer_start=len(ids) - len(answer), key=key)


def multi_needle_ids(
    tokenizer: Any,
    filler: Sequence[int],
    length: int,
    rng: np.random.Generator,
    needles: int,
    templates: Sequence[NeedleTemplate],
    *,
    bos: bool = True,
) -> list[int]:
    """``length`` tokens: BOS + filler with 1 to ``needles`` key/value lines, each in a random
    template of ``templates`` at a uniform random depth (on a line boundary), then one question
    + key per needle, in a random order. Trained on with the ordinary next-token loss.

    ``build_prompt`` is the one-needle case. Several needles per sequence give several answers
    to learn from per sequence, and force the model to match the name rather than copy the only
    number it saw; mixing templates within a sequence forces it to match the name, not the form.
    """
    count = int(rng.integers(1, needles + 1))
    chosen = [templates[int(i)] for i in rng.integers(0, len(templates), count)]
    names = distinct_names(chosen, rng)
    keys = [random_key(rng) for _ in chosen]
    lines = [
        encode(tokenizer, "\n" + t.needle_text(n, k) + "\n")
        for t, n, k in zip(chosen, names, keys, strict=True)
    ]
    asks = []
    for i in rng.permutation(count):
        question, answer = question_and_answer(tokenizer, chosen[i], names[i], keys[i])
        asks += question + answer
    head = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    n_filler = length - len(head) - sum(map(len, lines)) - len(asks)
    if n_filler < 0:
        raise CtxextError(
            f"{count} needles do not fit in {length} tokens; use fewer needles or longer sequences"
        )
    body, _ = place_lines(tokenizer, list(filler[:n_filler]), lines, list(rng.random(count)))
    return head + body + asks
