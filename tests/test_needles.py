"""Retrieval templates (ctxext.needles): every form builds an exact-length prompt whose answer
is the key, the train/held-out split is real, and training sequences only use training forms."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import BUNDLED

from ctxext.errors import CtxextError
from ctxext.needles import (
    TEMPLATES,
    build_prompt,
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


def test_split_is_disjoint_and_each_side_has_code_and_prose():
    train, held = templates_of("train"), templates_of("heldout")
    assert {t.name for t in train}.isdisjoint(t.name for t in held)
    assert len(train) + len(held) == len(TEMPLATES) == len(templates_of("all"))
    for side in (train, held):
        assert {t.register for t in side} == {"code", "prose"}
    # No held-out form repeats a training form's (needle, question) pair or its query.
    train_questions = {re.sub(r"\{name\}", "", t.question) for t in train}
    for t in held:
        assert re.sub(r"\{name\}", "", t.question) not in train_questions, t.name


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("length,depth", [(128, 0.0), (301, 0.5), (200, 1.0)])
def test_every_template_builds_an_exact_prompt_answered_by_the_key(
    tok, filler, name, length, depth
):
    t = TEMPLATES[name]
    rng = np.random.default_rng(7)
    key, who = random_key(rng), random_name(rng, t.shape)
    p = build_prompt(tok, filler, length, depth, key, who, t)
    assert len(p.input_ids) == length and p.input_ids[0] == tok.bos_token_id
    text = tok.decode(p.input_ids)
    assert "\n" + t.needle_text(who, key) + "\n" in text
    assert text.endswith("\n" + t.question_text(who) + t.joiner + key)
    assert tok.decode(p.answer_ids).strip() == key


def test_needle_moves_with_depth_and_sits_on_a_line(tok, filler):
    t = TEMPLATES["snake-return"]
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
    assert [t.split for t in resolve_templates("heldout")] == ["heldout"] * 3
    assert resolve_templates("code") == [TEMPLATES["const"]]  # the old single template's name
    assert [t.name for t in resolve_templates("dict, const,dict")] == ["dict", "const"]
    with pytest.raises(CtxextError, match="unknown retrieval template 'nope'"):
        resolve_templates("const,nope")


def test_multi_needle_sequences_use_training_forms_and_ask_for_every_value(tok, filler):
    forms = templates_of("train")
    rng = np.random.default_rng(3)
    counts, used = set(), set()
    for _ in range(60):
        ids = multi_needle_ids(tok, filler, 256, rng, 4, forms)
        assert len(ids) == 256 and ids[0] == tok.bos_token_id
        text = tok.decode(ids[1:])
        asked = 0
        for t in TEMPLATES.values():
            q = re.escape(t.question_text("NAME")).replace("NAME", f"({SHAPES[t.shape]})")
            for who, key in re.findall("\n" + q + re.escape(t.joiner) + r"(\d{5})(?=\n|$)", text):
                assert t.split == "train", t.name  # held-out forms never appear in training
                assert "\n" + t.needle_text(who, key) + "\n" in text  # given earlier, same value
                used.add(t.name)
                asked += 1
        counts.add(asked)
    assert counts == {1, 2, 3, 4}
    assert used == {t.name for t in forms}
