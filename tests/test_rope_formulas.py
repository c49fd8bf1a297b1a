"""ctxext.rope.formulas: the papers' formulas against worked values and the published rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctxext.rope.formulas import ntk_theta, reference_inv_freq, yarn_correction_range, yarn_ramp


def test_yarn_correction_range_llama2() -> None:
    # Llama 2 (d = 128, theta = 1e4, L = 4096): dim(32) = 20.9 -> 20, dim(1) = 45.0 -> 46
    assert yarn_correction_range(10000.0, 128, 4096, 32.0, 1.0) == (20, 46)
    ramp = yarn_ramp(10000.0, 128, 4096)
    assert ramp[20] == 0.0 and ramp[46] == 1.0 and ramp[33] == pytest.approx(13 / 26)


def test_reference_formulas() -> None:
    base, _ = reference_inv_freq("default", 10000.0, 8, 1.0, 2048)
    np.testing.assert_allclose(base, [1.0, 0.1, 0.01, 0.001])
    lin, scale = reference_inv_freq("linear", 10000.0, 8, 2.0, 2048)
    np.testing.assert_allclose(lin, base / 2)
    assert scale == 1.0
    ntk, ntk_scale = reference_inv_freq("ntk", 10000.0, 8, 2.0, 2048)
    assert ntk_scale == 1.0
    # bloc97's base change written out by hand (theta' = theta * s^(d/(d-2)), d = 8, s = 2),
    # not through ntk_theta: pair j rotates at theta'^(-2j/d).
    theta_ntk = 10000.0 * 2.0 ** (8 / 6)
    np.testing.assert_allclose(ntk, [theta_ntk ** (-2 * j / 8) for j in range(4)], rtol=1e-12)
    assert ntk[0] == 1.0 and ntk[-1] == pytest.approx(base[-1] / 2)  # last pair exactly PI
    assert ntk_theta(10000.0, 8, 2.0) == pytest.approx(theta_ntk, rel=1e-12)
    same, _ = reference_inv_freq("dynamic", 10000.0, 8, 2.0, 2048, seq_len=1000)
    np.testing.assert_array_equal(same, base)
    # the bracket (s * seq / L) - (s - 1) reaches s at seq = L (2s - 1) / s, not at s x L
    grown, _ = reference_inv_freq("dynamic", 10000.0, 8, 2.0, 2048, seq_len=3072)
    np.testing.assert_allclose(grown, ntk)
    at_target, _ = reference_inv_freq("dynamic", 10000.0, 8, 2.0, 2048, seq_len=4096)
    np.testing.assert_allclose(at_target, reference_inv_freq("ntk", 10000.0, 8, 3.0, 2048)[0])
    _, mscale = reference_inv_freq("yarn", 10000.0, 8, 4.0, 2048)
    assert mscale == pytest.approx(0.1 * math.log(4) + 1)
    _, fixed = reference_inv_freq("yarn", 10000.0, 8, 4.0, 2048, attention_factor=1.5)
    assert fixed == 1.5
    with pytest.raises(TypeError):
        reference_inv_freq("linear", 10000.0, 8, 2.0, 2048, beta_fast=3.0)


def test_llama3_reference_matches_meta_rule() -> None:
    # Llama 3.1: theta 5e5, d 128, L 8192, s 8, low 1, high 4 (Meta's apply_scaling)
    inv, _ = reference_inv_freq("llama3", 500000.0, 128, 8.0, 8192)
    base, _ = reference_inv_freq("default", 500000.0, 128, 1.0, 8192)
    for got, freq in zip(inv, base, strict=True):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            want = freq
        elif wavelen > 8192 / 1:
            want = freq / 8
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            want = (1 - smooth) * freq / 8 + smooth * freq
        assert got == pytest.approx(want, rel=1e-12)
