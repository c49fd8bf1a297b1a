"""Every factor method written as LongRoPE per-pair factors, for architectures that read only
``longrope`` (Phi-3, PhiMoE: transformers 5 validates their rope_type to default or longrope).

LongRoPE divides pair j's frequency by lambda_j (``long_factor`` past the trained length,
``short_factor`` up to it) and scales cos/sin by ``attention_factor``. Any method whose
frequencies do not depend on the sequence length is such a list:

* linear (PI): lambda_j = s for every pair;
* ntk: theta' = theta * k gives lambda_j = k ** (2j / d);
* yarn: the by-parts ramp, lambda_j = 1 / ((1 - r_j) + r_j / s), and its attention factor
  (0.1 ln s + 1 unless given);
* llama3: the same blend with Llama 3.1's wavelength weights.

The same list goes in both ``short_factor`` and ``long_factor`` (these methods apply at every
length, as transformers applies them directly), and ``attention_factor`` is always written
(1 for all but YaRN), since longrope's default would be sqrt(1 + ln s / ln L). Dynamic NTK
re-derives theta from each sequence's length, which fixed factors cannot express.

Plain dict in, dict out; float64 (numpy) maths from :mod:`ctxext.rope.formulas`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Methods that cannot be written as fixed per-pair factors, with the reason.
NOT_EXPRESSIBLE = {
    "dynamic": (
        "dynamic NTK recomputes theta for each sequence length, which fixed longrope factors "
        "cannot express"
    ),
}


def method_as_longrope(
    entry: Mapping[str, Any],
    *,
    factor: float,
    base_theta: float,
    rotary_dim: int,
    trained_length: int,
) -> dict[str, Any]:
    """The longrope rope dict equivalent to ``entry``, the dict a direct method writes.

    ``entry`` is what :func:`ctxext.rope.extend_config` writes for a Llama: rope_type linear,
    default (static NTK: an enlarged rope_theta), yarn or llama3 with its options, or longrope
    (returned as it is). ``factor`` is the scale s, ``base_theta`` is the unscaled theta, ``rotary_dim`` the rotary
    dimension d, ``trained_length`` the original context length L.
    """
    from ctxext.rope import formulas

    kind = str(entry["rope_type"])
    if kind == "longrope":
        return dict(entry)
    if kind in NOT_EXPRESSIBLE:
        raise ValueError(NOT_EXPRESSIBLE[kind])
    d, length = int(rotary_dim), int(trained_length)
    if kind == "default":  # static NTK: the base moved from base_theta to entry's theta
        inv, scale = formulas.default_inv_freq(float(entry["rope_theta"]), d), 1.0
    else:
        names = formulas.OPTION_DEFAULTS[kind]
        options = {k: entry[k] for k in names if entry.get(k) is not None}
        inv, scale = formulas.reference_inv_freq(
            kind, float(base_theta), d, float(entry["factor"]), length, **options
        )
    lam = [float(x) for x in formulas.rescale_factors(inv, float(base_theta), d)]
    out: dict[str, Any] = {"rope_type": "longrope", "rope_theta": float(base_theta)}
    if "partial_rotary_factor" in entry:
        out["partial_rotary_factor"] = entry["partial_rotary_factor"]
    out.update(
        {
            "factor": float(factor),
            "original_max_position_embeddings": length,
            "long_factor": lam,
            "short_factor": list(lam),
            "attention_factor": float(scale),
        }
    )
    return out
