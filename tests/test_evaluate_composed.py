"""Composed training forms (ctxext.evaluate.composed): drawn from parts, never a held-out line."""

from __future__ import annotations

import numpy as np
from test_evaluate_needles import HELDOUT_MARKERS, _skeleton

from ctxext.evaluate.composed import composed_form
from ctxext.evaluate.needles import templates_of


def _draw(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [composed_form(rng) for _ in range(n)]


def test_composed_forms_share_no_syntax_or_word_with_the_held_out_forms():
    forms = _draw(5000)
    held = templates_of("heldout")
    held_needles = {_skeleton(t.needle) for t in held}
    held_questions = {_skeleton(t.question) for t in held}
    for f in forms:
        assert f.split == "train" and f.family in ("code", "prose")
        assert _skeleton(f.needle) not in held_needles, f.needle
        assert _skeleton(f.question) not in held_questions, f.question
        text = f.needle + " " + f.question
        for family, words in HELDOUT_MARKERS.items():
            assert not any(w in text for w in words), (family, text)


def test_composed_forms_are_many_and_fill_in_like_any_template():
    forms = _draw(3000, seed=1)
    code = {(f.needle, f.question) for f in forms if f.register == "code"}
    prose = {(f.needle, f.question) for f in forms if f.register == "prose"}
    # Far more distinct syntaxes than the 288-form grid, in both registers.
    assert len(code) > 1500 and len(prose) > 400
    for f in forms[:200]:
        needle = f.needle_text("max_retry_3a", "48213")
        assert "max_retry_3a" in needle and "48213" in needle
        assert "max_retry_3a" in f.question_text("max_retry_3a")
        assert "{" not in f.question_text("x").replace('opts["', "")
