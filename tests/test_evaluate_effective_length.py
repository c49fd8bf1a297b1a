"""The effective-length rule (RULER-style, per retrieval family against the unscaled model) on
hand-built results: which families are judged, their thresholds, the order of lengths, the
far-context gain, the one-key flag and the floor."""

from __future__ import annotations

import math

import pytest

from ctxext.evaluate.context_use import ContextUseResult
from ctxext.evaluate.effective_length import (
    Reference,
    Tally,
    effective_length,
    judge,
    rule_text,
    wilson,
)
from ctxext.evaluate.scoring import RetrievalResult

DEPTHS = [0.0, 1.0]
#: One held-out form per family (two in code-binding: a family pools its forms).
FORMS = {
    "code-binding": ["setter-get", "params-dict"],
    "code-question": ["const-expect"],
    "prose": ["prose-code"],
}


def _result(hits: dict[str, dict[int, list[int]]], trials: int = 4) -> RetrievalResult:
    """``hits[template][length]``: correct keys per depth (``trials`` keys per cell)."""
    names = list(hits)
    lengths = sorted(next(iter(hits.values())))
    by_template = {n: [[h / trials for h in hits[n][L]] for L in lengths] for n in names}
    correct = [[sum(hits[n][L][j] for n in names) for j in range(len(DEPTHS))] for L in lengths]
    per = trials * len(names)
    return RetrievalResult(
        lengths=lengths,
        depths=DEPTHS,
        trials=per,
        accuracy=[[c / per for c in row] for row in correct],
        correct=correct,
        template=",".join(names),
        templates=names,
        by_template=by_template,
    )


def _same(per_family: dict[str, dict[int, list[int]]]) -> RetrievalResult:
    """Every form of a family scores ``per_family[family][length]`` (hits per depth, of 4)."""
    return _result({t: per_family[f] for f, forms in FORMS.items() for t in forms})


def _reference(per_family: dict[str, list[int]], length: int = 256) -> Reference:
    res = _same({f: {length: hits} for f, hits in per_family.items()})
    return Reference.of(res, length, "base", "hand-built")


FULL = [4, 4]  # 8 of 8 keys per form
GOOD_REF = _reference({"code-binding": FULL, "code-question": FULL, "prose": [1, 1]})


def _gain(length: int, ci_low: float, window: int = 256) -> ContextUseResult:
    last = {"start": window, "end": length, "gain_bits": ci_low + 0.1, "ci_low": ci_low,
            "ci_high": ci_low + 0.2}  # fmt: skip
    return ContextUseResult(length=length, window=window, stride=window // 4, n_docs=8,
                            gain_bits=0.1, ci_low=0.0, ci_high=0.2, buckets=[last])  # fmt: skip


def test_a_family_counts_only_where_the_unscaled_model_reaches_the_floor():
    detail = judge([256], _same({f: {256: FULL} for f in FORMS}), None, GOOD_REF, 0.5)
    fams = detail["families"]
    assert fams["code-binding"]["templates"] == ["setter-get", "params-dict"]
    assert fams["code-binding"]["reference"]["hits"] == 16  # pooled over forms and depths
    assert fams["code-binding"]["reference"]["n"] == 16
    assert fams["code-binding"]["counted"] and fams["code-question"]["counted"]
    prose = fams["prose"]  # 2 of 8 = 25% < 50%
    assert not prose["counted"] and prose["threshold"] is None
    assert prose["note"] == (
        "not judged: the unscaled model retrieves 25% at 256, below the floor 50%"
    )
    assert detail["retrieval_judged"] and detail["basis"] == ["retrieval"]
    assert detail["reference"] == {"model": "base", "length": 256, "source": "hand-built"}
    # A family not judged does not hold a length back, however badly it does there.
    res = _same({"code-binding": {256: FULL}, "code-question": {256: FULL}, "prose": {256: [0, 0]}})
    assert effective_length([256], res, None, GOOD_REF, 0.5) == 256
    assert (
        "passes"
        not in judge([256], res, None, GOOD_REF, 0.5)["lengths"]["256"]["families"]["prose"]
    )


@pytest.mark.parametrize(
    ("ref_hits", "floor", "threshold"),
    [
        ([4, 4], 0.5, 0.9),  # r = 1: 0.9 r
        ([3, 3], 0.5, 0.675),  # r = 0.75: 0.9 r
        ([2, 2], 0.5, 0.5),  # r = 0.5: 0.9 r = 0.45 < floor
        ([3, 3], 0.7, 0.7),  # r = 0.75: 0.9 r = 0.675 < floor 0.7
    ],
)
def test_threshold_is_the_floor_or_nine_tenths_of_the_reference(ref_hits, floor, threshold):
    ref = _reference({"code-binding": ref_hits, "code-question": [0, 0], "prose": [0, 0]})
    fam = judge([256], None, None, ref, floor)["families"]
    assert fam == {}  # no retrieval result: no family to judge
    res = _same({f: {256: ref_hits} for f in FORMS})
    detail = judge([256], res, None, ref, floor)
    assert detail["families"]["code-binding"]["threshold"] == pytest.approx(threshold)
    assert not detail["families"]["code-question"]["counted"]
    # The reference length passes its own threshold (r >= max(floor, 0.9 r) when judged).
    assert detail["lengths"]["256"]["counts"] and detail["effective_length"] == 256


def test_a_length_fails_when_a_judged_family_is_below_its_threshold():
    # code-binding: threshold 0.9 of 16 keys (two forms); 15/16 passes, 14/16 = 87.5% fails.
    res = _same({f: {256: FULL, 512: FULL} for f in FORMS})
    res.by_template["params-dict"][1] = [1.0, 0.75]
    detail = judge([256, 512], res, None, GOOD_REF, 0.5)
    assert detail["effective_length"] == 512
    res.by_template["params-dict"][1] = [0.75, 0.75]
    detail = judge([256, 512], res, None, GOOD_REF, 0.5)
    assert detail["effective_length"] == 256
    assert detail["lengths"]["512"]["decision"] == "fails: code-binding 88% < 90%"
    cell = detail["lengths"]["512"]["families"]["code-binding"]
    assert (cell["hits"], cell["n"], cell["passes"]) == (14, 16, False)
    assert cell["ci_low"] < 14 / 16 < cell["ci_high"]


def test_a_length_after_a_failed_shorter_one_does_not_count():
    ok, bad = FULL, [0, 4]
    res = _same({f: {256: ok, 512: bad if f == "code-question" else ok, 1024: ok} for f in FORMS})
    detail = judge([256, 512, 1024], res, None, GOOD_REF, 0.5)
    assert detail["effective_length"] == 256
    assert detail["lengths"]["1024"]["passes"] and not detail["lengths"]["1024"]["counts"]
    assert detail["lengths"]["1024"]["decision"] == "passes, but 512 failed"
    # The shortest length failing: none.
    res = _same({f: {256: bad, 512: ok} for f in FORMS})
    assert effective_length([256, 512], res, None, GOOD_REF, 0.5) is None


def test_the_far_context_gain_gates_lengths_beyond_the_window():
    res = _same({f: {n: FULL for n in (256, 512, 1024)} for f in FORMS})
    gains = {512: _gain(512, 0.01), 1024: _gain(1024, 0.0)}  # "above 0" is strict
    detail = judge([256, 512, 1024], res, gains, GOOD_REF, 0.5)
    assert detail["effective_length"] == 512 and detail["basis"] == [
        "retrieval",
        "far-context gain",
    ]
    assert detail["lengths"]["1024"]["gain"]["passes"] is False
    assert detail["lengths"]["1024"]["decision"] == "fails: far-context gain's interval not above 0"
    assert "gain" not in detail["lengths"]["256"]  # not past the window: nothing far
    # No family reaches the floor: retrieval is not judged and the gain alone decides.
    weak = _reference({f: [1, 0] for f in FORMS})
    detail = judge([256, 512, 1024], res, gains, weak, 0.5)
    assert not detail["retrieval_judged"] and detail["basis"] == ["far-context gain"]
    assert detail["effective_length"] == 512
    # Neither: nothing judged, no length.
    detail = judge([256, 512], res, None, weak, 0.5)
    assert detail["effective_length"] is None and detail["basis"] == []
    assert detail["lengths"]["256"]["decision"].startswith("not judged")
    assert effective_length([256], None, None, None, 0.5) is None


def test_one_key_decides_where_one_key_more_or_less_flips_a_verdict():
    assert Tally(8, 8).one_key_decides(0.9)  # 7/8 = 87.5% would fail
    assert not Tally(19, 20).one_key_decides(0.9)  # 18/20 = 90% still passes
    assert Tally(18, 20).one_key_decides(0.9)  # 17/20 fails
    assert Tally(17, 20).one_key_decides(0.9)  # 18/20 would pass
    assert not Tally(10, 20).one_key_decides(0.9)
    assert not Tally(0, 8).one_key_decides(0.9) and not Tally(0, 8).passes(0.9)
    # In the detail: per family x length, per length, and the reference's floor decision.
    res = _same({f: {256: FULL, 512: FULL} for f in FORMS})
    res.by_template["params-dict"][1] = [1.0, 0.75]
    detail = judge([256, 512], res, None, GOOD_REF, 0.5)
    cell = detail["lengths"]["512"]["families"]["code-binding"]  # 15/16; 14/16 fails
    assert (
        cell["passes"] and cell["one_key_decides"] and detail["lengths"]["512"]["one_key_decides"]
    )
    assert detail["lengths"]["512"]["families"]["code-question"]["one_key_decides"]  # 7/8 fails
    assert "one_key_decides" not in detail["lengths"]["512"]["families"]["prose"]  # not judged
    edge = _reference({"code-binding": [2, 2], "code-question": FULL, "prose": [1, 1]})
    assert judge([256], res, None, edge, 0.5)["families"]["code-binding"]["one_key_decides"]
    assert not judge([256], res, None, edge, 0.5)["families"]["code-question"]["one_key_decides"]


def test_the_floor_decides_which_families_are_judged():
    res = _same({f: {256: FULL, 512: [1, 1] if f == "prose" else FULL} for f in FORMS})
    assert judge([256, 512], res, None, GOOD_REF, 0.5)["effective_length"] == 512  # prose 25%: out
    detail = judge([256, 512], res, None, GOOD_REF, 0.25)  # prose judged, threshold 25%
    assert detail["families"]["prose"]["threshold"] == pytest.approx(0.25)
    assert detail["effective_length"] == 512  # 2/8 = 25% reaches it exactly
    res.by_template["prose-code"][1] = [0.25, 0.0]
    assert judge([256, 512], res, None, GOOD_REF, 0.25)["effective_length"] == 256
    assert "floor 25%" in rule_text(0.25) and "floor 50%" in rule_text(0.5)


def test_a_tally_exactly_at_a_threshold_passes_despite_float_rounding():
    ref = Tally(7, 10)  # 0.9 x 0.7 is 0.6299999999999999 in floats
    assert Tally(63, 100).passes(0.9 * ref.accuracy) and not Tally(62, 100).passes(0.63)


def test_wilson_interval():
    low, high = wilson(0, 15)
    assert low == 0.0 and high == pytest.approx(0.2039, abs=1e-4)
    low, high = wilson(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson(0, 0) == (0.0, 1.0)
    assert all(math.isfinite(x) for x in wilson(10, 10))


def test_wilson_interval_holds_its_proportion_at_every_count():
    """At 0 (or n) hits the bound is exactly 0 (or 1): rounding once left ~3e-17 at some n, an
    interval that excluded its own proportion."""
    for n in range(1, 121):
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        for hits in range(n + 1):
            low, high = wilson(hits, n)
            assert 0.0 <= low <= hits / n <= high <= 1.0, (hits, n)


def test_other_selections_judge_the_family_of_each_template():
    from ctxext.evaluate.effective_length import families

    res = _result({"plain-assert-upper": {256: FULL}, "prose-value-value-title": {256: FULL},
                   "const-expect": {256: FULL}})  # fmt: skip
    assert families(res) == {
        "code (train)": ["plain-assert-upper"],
        "prose (train)": ["prose-value-value-title"],
        "code-question": ["const-expect"],
    }
    # The passkey: one family; a result without per-template figures: one, pooled.
    passkey = RetrievalResult(lengths=[256], depths=DEPTHS, trials=4, accuracy=[[1.0, 0.5]],
                              correct=[[4, 2]], template="text", templates=["text"],
                              by_template={"text": [[1.0, 0.5]]})  # fmt: skip
    assert families(passkey) == {"text": ["text"]}
    ref = Reference.of(passkey, 256, "base", "own")
    assert ref.families["text"] == Tally(6, 8)
    bare = RetrievalResult(lengths=[256], depths=DEPTHS, trials=4, accuracy=[[1.0, 0.5]],
                           correct=[[4, 2]], template="code")  # fmt: skip
    assert list(families(bare)) == ["code"]
    assert effective_length([256], bare, None, Reference.of(bare, 256, "b", "own"), 0.5) == 256
