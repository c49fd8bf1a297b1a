"""The papers' RoPE frequencies for each scaling method, in float64 (shared, not test-only).

The one place these formulas live. Production uses them where ctxext itself must compute a
frequency: the static NTK theta written by :mod:`ctxext.rope.write` (there is no ``ntk``
rope_type for transformers to compute it), ``ctxext inspect``'s per-pair table and tune's
LongRoPE view of every method. The exactness tests (tests/test_rope_exactness.py) compare what
*transformers* computes from a config written by :func:`ctxext.rope.extend_config` against these:
the two sides are independent because the written config holds only the method's parameters
(factor, betas, ...) and transformers derives the frequencies with its own code. The one value we
write that comes from here, NTK's theta, is checked against bloc97's formula typed out in the
test itself, not through this module. A second copy of these formulas inside the package would
only be a duplicate that could drift.

Notation used throughout:

* ``d``: the rotary dimension (head_dim x partial_rotary_factor), always even.
* pair ``j`` (0 <= j < d/2) rotates by ``theta_j = theta ** (-2j/d)`` radians per position
  (Su et al. 2021, RoFormer). Its wavelength is ``2*pi / theta_j`` positions.
* ``s``: the scale factor (new length / trained length). ``L``: the trained (original) length.

Everything is numpy float64, so it is a tighter yardstick than the float32 maths of transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ctxext.rope import methods

REFERENCE_METHODS = ("default", *methods.ALL_METHODS)

# Keyword options each formula accepts, with the papers' defaults: each method's options except
# ntk's theta_multiplier, a tuned replacement for the formula's own s ** (d / (d - 2)).
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    m: {
        name: methods.OPTION_DEFAULTS[name]
        for name in methods.OPTIONS_OF.get(m, ())
        if name != "theta_multiplier"
    }
    for m in REFERENCE_METHODS
}


def default_inv_freq(theta: float, rotary_dim: int) -> np.ndarray:
    """RoFormer: pair j rotates at theta ** (-2j/d) radians per position."""
    j = np.arange(rotary_dim // 2, dtype=np.float64)
    return np.power(float(theta), -2.0 * j / rotary_dim)


def ntk_theta(theta: float, rotary_dim: int, factor: float) -> float:
    """bloc97's NTK-aware base change: theta' = theta * s ** (d / (d - 2)).

    The exponent is chosen so that the lowest-frequency pair (j = d/2 - 1, exponent (d-2)/d) is
    slowed by exactly s (interpolated like PI) while pair 0 keeps its frequency (extrapolated).
    """
    d = rotary_dim
    return float(theta) * float(factor) ** (d / (d - 2))


def dynamic_theta(
    theta: float, rotary_dim: int, factor: float, max_len: int, seq_len: int
) -> float:
    """emozilla's dynamic NTK: re-derive the NTK base from the current sequence length.

    theta' = theta * ((s * seq_len / L) - (s - 1)) ** (d / (d - 2)) once seq_len > L. At
    seq_len = L the bracket is 1 (no change); it reaches s (static NTK with factor s) already at
    seq_len = L (2s - 1) / s, and at seq_len = s * L it is s^2 - s + 1: stronger than static NTK.
    """
    if seq_len <= max_len:
        return float(theta)
    d = rotary_dim
    ratio = (factor * seq_len / max_len) - (factor - 1.0)
    return float(theta) * ratio ** (d / (d - 2))


def yarn_correction_range(
    theta: float, rotary_dim: int, original_length: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """Pair indices where YaRN's ramp starts and ends (Peng et al. 2023, reference code).

    A pair j completes r = L * theta_j / (2*pi) turns within the trained length. Solving for j
    gives dim(r) = d * ln(L / (2*pi*r)) / (2 ln theta). Pairs doing more than beta_fast turns
    (j < dim(beta_fast)) are kept; pairs doing fewer than beta_slow turns are interpolated.
    The bounds are floored/ceiled and clamped to [0, d - 1] as in the paper's code.
    """
    d = rotary_dim

    def dim_of(turns: float) -> float:
        return d * math.log(original_length / (2 * math.pi * turns)) / (2 * math.log(theta))

    low = math.floor(dim_of(beta_fast))
    high = math.ceil(dim_of(beta_slow))
    return max(low, 0), min(high, d - 1)


def yarn_ramp(
    theta: float,
    rotary_dim: int,
    original_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> np.ndarray:
    """Per-pair interpolation weight of YaRN: 0 = keep (extrapolate), 1 = divide by s."""
    low, high = yarn_correction_range(theta, rotary_dim, original_length, beta_fast, beta_slow)
    if low == high:
        high += 0.001  # the reference code's guard against a zero-width ramp
    j = np.arange(rotary_dim // 2, dtype=np.float64)
    return np.clip((j - low) / (high - low), 0.0, 1.0)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's "mscale": sqrt(1/t) = 0.1 ln s + 1 multiplies cos and sin (so q.k by its square)."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def llama3_blend(
    theta: float,
    rotary_dim: int,
    original_length: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> np.ndarray:
    """Per-pair interpolation weight of Llama 3.1's rule: 0 = keep, 1 = divide by s.

    Wavelengths shorter than L / high_freq_factor are kept, longer than L / low_freq_factor are
    divided by s, and in between the weight falls linearly in L / wavelength ("smooth").
    """
    wavelength = 2 * math.pi / default_inv_freq(theta, rotary_dim)
    smooth = (original_length / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    weight = 1.0 - smooth
    weight = np.where(wavelength < original_length / high_freq_factor, 0.0, weight)
    weight = np.where(wavelength > original_length / low_freq_factor, 1.0, weight)
    return weight


def longrope_attention_factor(factor: float, original_length: int) -> float:
    """LongRoPE / Phi-3's scale of cos and sin: sqrt(1 + ln s / ln L), 1 when s <= 1."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_length))


def rescale_factors(inv_freq: np.ndarray, theta: float, rotary_dim: int) -> np.ndarray:
    """The LongRoPE view of any method: lambda_j = theta_j / theta'_j (1 = kept, s = PI).

    LongRoPE writes every method as per-pair divisors of the original frequencies, so PI is
    lambda_j = s for all j, NTK is lambda_j = s ** (2j / (d - 2)), and YaRN blends 1 and s.
    """
    return default_inv_freq(theta, rotary_dim) / np.asarray(inv_freq, dtype=np.float64)


# --- one function per method: (theta, d, s, L, seq_len, options) -> (inv_freq, attention scale)


def _ref_default(theta, d, s, length, seq_len, opts):
    return default_inv_freq(theta, d), 1.0


def _ref_linear(theta, d, s, length, seq_len, opts):
    # Chen et al. 2023 (Position Interpolation): position m -> m / s, i.e. every theta_j / s.
    return default_inv_freq(theta, d) / s, 1.0


def _ref_ntk(theta, d, s, length, seq_len, opts):
    return default_inv_freq(ntk_theta(theta, d, s), d), 1.0


def _ref_dynamic(theta, d, s, length, seq_len, opts):
    seq_len = length if seq_len is None else seq_len
    return default_inv_freq(dynamic_theta(theta, d, s, length, seq_len), d), 1.0


def _ref_yarn(theta, d, s, length, seq_len, opts):
    # "NTK-by-parts": blend the PI frequency (theta_j / s) and the original one by the ramp.
    base = default_inv_freq(theta, d)
    ramp = yarn_ramp(theta, d, length, opts["beta_fast"], opts["beta_slow"])
    inv = base / s * ramp + base * (1.0 - ramp)
    scale = opts["attention_factor"]
    return inv, yarn_attention_factor(s) if scale is None else float(scale)


def _ref_llama3(theta, d, s, length, seq_len, opts):
    base = default_inv_freq(theta, d)
    weight = llama3_blend(theta, d, length, opts["low_freq_factor"], opts["high_freq_factor"])
    return base / s * weight + base * (1.0 - weight), 1.0


def _ref_longrope(theta, d, s, length, seq_len, opts):
    # Ding et al. 2024 (LongRoPE) as Phi-3 ships it: theta'_j = theta_j / lambda_j, with the
    # long factors once the current sequence is longer than L and the short ones otherwise.
    long = opts["long_factor"]
    if long is None:
        raise TypeError("longrope needs long_factor (a list of d/2 rescale factors)")
    short = opts["short_factor"]
    use_long = seq_len is not None and seq_len > length
    chosen = long if use_long else (short if short is not None else [1.0] * (d // 2))
    lam = _factor_array(chosen, d)
    scale = opts["attention_factor"]
    attention = longrope_attention_factor(s, length) if scale is None else float(scale)
    return default_inv_freq(theta, d) / lam, attention


def _factor_array(values: Sequence[float], d: int) -> np.ndarray:
    lam = np.asarray(values, dtype=np.float64)
    if lam.shape != (d // 2,):
        raise ValueError(f"longrope factors must be {d // 2} numbers (d/2), got {lam.shape}")
    return lam


_REFERENCES: dict[str, Callable[..., tuple[np.ndarray, float]]] = {
    "default": _ref_default,
    "linear": _ref_linear,
    "ntk": _ref_ntk,
    "dynamic": _ref_dynamic,
    "yarn": _ref_yarn,
    "llama3": _ref_llama3,
    "longrope": _ref_longrope,
}


def reference_inv_freq(
    method: str,
    theta: float,
    rotary_dim: int,
    factor: float,
    original_length: int,
    seq_len: int | None = None,
    **options: Any,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float64, length d/2) and the cos/sin scale of ``method``.

    ``seq_len`` only matters for ``dynamic`` and ``longrope`` (the current sequence length;
    default: the trained length, i.e. no change / the short factors). ``options``:
    ``beta_fast``, ``beta_slow``, ``attention_factor`` (yarn); ``low_freq_factor``,
    ``high_freq_factor`` (llama3); ``long_factor``, ``short_factor`` (lists of d/2 divisors,
    short defaulting to ones) and ``attention_factor`` (longrope).
    """
    if method not in _REFERENCES:
        raise ValueError(f"unknown method {method!r}; expected one of {REFERENCE_METHODS}")
    if rotary_dim <= 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and > 2, got {rotary_dim}")
    unknown = set(options) - set(OPTION_DEFAULTS[method])
    if unknown:
        raise TypeError(f"options {sorted(unknown)} do not apply to method {method!r}")
    opts = {**OPTION_DEFAULTS[method], **options}
    return _REFERENCES[method](
        float(theta), int(rotary_dim), float(factor), int(original_length), seq_len, opts
    )
