"""ctxext.inspect: the summary and per-pair table `ctxext inspect` shows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from rope_configs import LLAMA, PYTHIA
from rope_configs import one_line_error as _error

from ctxext.inspect import pair_table, summarize
from ctxext.rope.read import analyze


def test_summarize_counts_pairs() -> None:
    summary = summarize(analyze(LLAMA))
    json.dumps(summary)
    assert summary["pairs"] == 64
    wavelengths = 2 * math.pi * 10000.0 ** (np.arange(64) * 2 / 128)
    assert summary["pairs_completing_turn"] == int((wavelengths <= 4096).sum())
    assert summary["pairs_completing_turn"] + summary["pairs_never_completing_turn"] == 64
    assert summarize(analyze({"model_type": "gpt2", "n_positions": 1024}))["pairs"] is None


def test_pair_table_shape_and_regimes() -> None:
    info = analyze(LLAMA)
    rows = pair_table(info, 16384)
    json.dumps(rows)
    assert len(rows) == 64 and [r["pair"] for r in rows] == list(range(64))
    s = 4.0
    for row in rows:
        assert row["completes_turn"] == (row["wavelength"] <= 4096)
        assert row["turns_in_trained"] == pytest.approx(4096 / row["wavelength"])
        assert row["methods"]["linear"]["stretch"] == pytest.approx(s)
        assert row["methods"]["linear"]["regime"] == "interpolated"
        # YaRN's ramp is its interpolation weight: new frequency = (1 - ramp) x old + ramp x
        # old / s, so 1/stretch = 1 - ramp + ramp/s; pairs turning more than beta_fast = 32
        # times in the trained length are kept (0), those turning less than beta_slow = 1 are
        # divided by s (1).
        ramp, yarn_stretch = row["methods"]["yarn"]["ramp"], row["methods"]["yarn"]["stretch"]
        assert 1 / yarn_stretch == pytest.approx(1 - ramp + ramp / s, rel=1e-9)
        if row["turns_in_trained"] > 32:
            assert ramp == 0.0
        if row["turns_in_trained"] < 1:
            assert ramp == 1.0
    ntk = [r["methods"]["ntk"] for r in rows]
    assert ntk[0]["regime"] == "extrapolated" and ntk[-1]["regime"] == "interpolated"
    assert all(r["regime"] == "blended" for r in ntk[1:-1])
    # dynamic NTK at seq_len = s x L equals static NTK with s^2 - s + 1 (= 13 for s = 4)
    stronger = pair_table(info, 4096 * 13, methods=("ntk",))
    for row, ntk13 in zip(rows, stronger, strict=True):
        dynamic = row["methods"]["dynamic"]["wavelength"]
        assert dynamic == pytest.approx(ntk13["methods"]["ntk"]["wavelength"])
    yarn = [r["methods"]["yarn"] for r in rows]
    assert yarn[0]["regime"] == "extrapolated" and yarn[-1]["regime"] == "interpolated"
    ramps = [y["ramp"] for y in yarn]
    assert ramps == sorted(ramps) and 0.0 < ramps[len(ramps) // 2] < 1.0  # a real blend between
    llama3 = [r["methods"]["llama3"]["regime"] for r in rows]
    assert llama3[0] == "extrapolated" and llama3[-1] == "interpolated" and "blended" in llama3


def test_pair_table_refusals_and_subset() -> None:
    _error(pair_table, analyze({"model_type": "gpt2"}), 4096)
    _error(pair_table, analyze(LLAMA), 1024)
    _error(pair_table, analyze(LLAMA), 8192, methods=("nope",))
    rows = pair_table(analyze(PYTHIA), 8192, methods=("yarn",), factor=2.0)
    assert len(rows) == 8 and set(rows[0]["methods"]) == {"yarn"}
    assert rows[-1]["methods"]["yarn"]["stretch"] == pytest.approx(2.0)
