"""Retrieval templates (ctxext.evaluate.needles): every form builds an exact-length prompt whose answer
is the key, the train/held-out split is real, and training sequences only use training forms."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import BUNDLED

from ctxext.errors import CtxextError
from ctxext.evaluate.needles import (
    HELDOUT_FAMILIES,
    TEMPLATES,
    build_prompt,
    families_of,
    multi_needle_ids,
    random_key,
    random_name,
    resolve_templates,
    templates_of,
)


@pytest.fixture(scope="module")
def tok():
    from ctxext.modeling import load_tokenizer

    return load_tokenizer(BUNDLED)


@pytest.fixture(scope="module")
def filler(tok):
    from ctxext.corpus import stdlib_documents

    docs = [d.text for _, d in zip(range(8), stdlib_documents("heldout"), strict=False)]
    return max((tok(t, add_special_tokens=False)["input_ids"] for t in docs), key=len)


#: Each name shape as a regex (a name must match its template's shape exactly).
SHAPES = {
    "upper": r"TOKEN_[0-9A-F]{4}",
    "snake": r"[a-z]+_[a-z]+_[0-9a-f]{2}",
    "camel": r"[a-z]+[A-Z][a-z]+[0-9A-F]{2}",
    "title": r"[A-Z][a-z]+ [A-Z][a-z]+ \d{1,3}",
}


#: The new syntax and words of each held-out family: no training line (grid or composed) has
#: any of them.
HELDOUT_MARKERS = {
    "code-binding": ["config.set", "config.get", "dict(", "params", "setattr", "getattr"],
    "code-question": ["const ", "expect(", "toBe", "let ", "assertEqual", "#define", "static_"],
    "prose": [
        "Remember",
        "code for",
        "What",
        "recorded",
        "log",
        "entry",
        "reads",
        "pin",
        "Pin",
    ],
}


def _skeleton(line: str) -> str:
    """A template line without its placeholders and spaces: its syntax."""
    return re.sub(r"\{name\}|\{key\}|\s", "", line)


def test_split_is_by_construction_no_held_out_line_is_a_training_line():
    train, held = templates_of("train"), templates_of("heldout")
    assert len(held) >= 6 and len(train) == 288 and len(TEMPLATES) == len(templates_of("all"))
    # At least two forms in each of the three held-out families, in report order.
    families = families_of([t.name for t in held])
    assert tuple(families) == HELDOUT_FAMILIES == ("code-binding", "code-question", "prose")
    assert all(len(v) >= 2 for v in families.values())
    assert {t.family for t in train} == {"code", "prose"}
    for side in (train, held):
        assert {t.register for t in side} == {"code", "prose"}
    # Over the whole grid: a held-out form shares no needle line and no question line with any
    # training form, neither as a template nor as syntax (placeholders and spaces removed) nor
    # filled with the same name and key.
    name, key = "max_retry_3a", "48213"
    for t in held:
        for u in train:
            assert _skeleton(t.needle) != _skeleton(u.needle), (t.name, u.name)
            assert _skeleton(t.question) != _skeleton(u.question), (t.name, u.name)
            assert t.needle_text(name, key) != u.needle_text(name, key)
            assert t.question_text(name) != u.question_text(name)
    # The new syntax and words of each held-out form appear nowhere in the training lines.
    training_text = " ".join(u.needle + " " + u.question for u in train)
    markers = HELDOUT_MARKERS
    for family, words in markers.items():
        for w in words:
            assert w not in training_text, (family, w)
        assert all(
            any(w in t.needle + t.question for w in words) for t in held if t.family == family
        )
    # The name's style is a separate axis: every held-out shape is a training shape.
    assert {t.shape for t in held} <= {u.shape for u in train}
    # The training grid: every code binding x query x shape, every prose statement x question x
    # prose shape.
    assert len({(t.needle, t.question) for t in train if t.register == "code"}) == 9 * 8
    assert len({(t.needle, t.question) for t in train if t.register == "prose"}) == 36


def test_every_template_builds_an_exact_prompt_answered_by_the_key(tok, filler):
    rng = np.random.default_rng(7)
    for i, t in enumerate(TEMPLATES.values()):
        length, depth = [(128, 0.0), (301, 0.5), (200, 1.0)][i % 3]
        key, who = random_key(rng), random_name(rng, t.shape)
        p = build_prompt(tok, filler, length, depth, key, who, t)
        assert len(p.input_ids) == length and p.input_ids[0] == tok.bos_token_id, t.name
        text = tok.decode(p.input_ids)
        assert "\n" + t.needle_text(who, key) + "\n" in text, t.name
        assert text.endswith("\n" + t.question_text(who) + t.joiner + key), t.name
        assert tok.decode(p.answer_ids).strip() == key, t.name


def test_needle_moves_with_depth_and_sits_on_a_line(tok, filler):
    t = TEMPLATES["plain-return-snake"]
    where = []
    for depth in (0.0, 0.5, 1.0):
        p = build_prompt(tok, filler, 200, depth, "11111", "max_size_01", t)
        text = tok.decode(p.input_ids)
        i = text.index(t.needle_text("max_size_01", "11111"))
        before = text[: i - 1]  # the needle's own line break follows BOS or a line of code
        assert before == tok.bos_token or before.rstrip(" \t").endswith("\n")
        where.append(i)
    assert where[0] < where[1] < where[2]


def test_text_without_line_breaks_still_gets_the_needle_at_its_depth(tok):
    body = tok("the quick brown fox jumps over the lazy dog " * 60, add_special_tokens=False)
    t = TEMPLATES["prose-code"]
    where = []
    for depth in (0.0, 0.5, 1.0):
        p = build_prompt(tok, body["input_ids"], 300, depth, "22222", "Falcon Ridge 7", t)
        text = tok.decode(p.input_ids)
        where.append(text.index("Remember: the code") / len(text))
    assert where[0] < 0.1 and 0.3 < where[1] < 0.7 and where[2] > 0.8


def test_short_filler_and_short_length_are_refused(tok):
    with pytest.raises(CtxextError, match="filler has 10 tokens"):
        build_prompt(tok, [5] * 10, 200, 0.5, "11111", "TOKEN_0001")
    with pytest.raises(CtxextError, match="too short for the prose-code prompt"):
        build_prompt(tok, [5] * 10, 8, 0.5, "11111", "Falcon Ridge 1", TEMPLATES["prose-code"])


def test_names_have_their_shape_and_vary():
    rng = np.random.default_rng(0)
    for shape, rx in SHAPES.items():
        names = [random_name(rng, shape) for _ in range(50)]
        assert all(re.fullmatch(rx, n) for n in names), names[:3]
        assert len(set(names)) > 40


def test_resolve_templates():
    assert [t.split for t in resolve_templates("heldout")] == ["heldout"] * 9
    # "code": the old single template, TOKEN_7F3A = 48213 ... assert TOKEN_7F3A == 48213
    (code,) = resolve_templates("code")
    assert (code.needle, code.question, code.shape) == (
        "{name} = {key}",
        "assert {name} ==",
        "upper",
    )
    names = [t.name for t in resolve_templates("dict-if-snake, code,dict-if-snake")]
    assert names == ["dict-if-snake", "plain-assert-upper"]
    with pytest.raises(CtxextError, match="unknown retrieval template 'nope'"):
        resolve_templates("code,nope")


def test_multi_needle_sequences_use_training_forms_and_ask_for_every_value(tok, filler):
    forms = templates_of("train")
    rng = np.random.default_rng(3)
    counts, used = set(), set()
    for _ in range(80):
        ids = multi_needle_ids(tok, filler, 256, rng, 4, forms)
        assert len(ids) == 256 and ids[0] == tok.bos_token_id
        text = tok.decode(ids[1:])
        asked = 0
        # Forms sharing a question differ in their needle: group them by what the end shows.
        groups: dict[tuple[str, str, str], list] = {}
        for t in TEMPLATES.values():
            groups.setdefault((t.question, t.joiner, t.shape), []).append(t)
        for (question, joiner, shape), group in groups.items():
            q = re.escape(question.format(name="NAME")).replace("NAME", f"({SHAPES[shape]})")
            for who, key in re.findall("\n" + q + re.escape(joiner) + r"(\d{5})(?=\n|$)", text):
                # Given earlier with the same value, in a training form.
                given = [t for t in group if f"\n{t.needle_text(who, key)}\n" in text]
                assert given and all(t.split == "train" for t in given), (who, key)
                used.update(t.name for t in given)
                asked += 1
        counts.add(asked)
    assert counts == {1, 2, 3, 4}
    assert len(used) > 40 and {t.register for t in forms if t.name in used} == {"code", "prose"}
