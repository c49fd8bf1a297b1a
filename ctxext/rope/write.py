"""Check an extension request and write the extended config (see :mod:`ctxext.rope` for how
transformers reads what is written here).

One writer and one option validator per method, in dispatch tables; :func:`new_length` is the one
rule for every new length; :func:`config_diff` is the dry-run view of a rewrite.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from ctxext.errors import CtxextError
from ctxext.rope.methods import ALL_METHODS, KEEP_SHORT_METHODS, OPTION_DEFAULTS, OPTIONS_OF
from ctxext.rope.read import (
    GEMMA3,
    LONGROPE_ONLY,
    RopeInfo,
    analyze,
    method_refusal,
    rope_entries,
)

# --------------------------------------------------------------------------- validating a request


def check_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
        raise CtxextError(f"factor must be a number > 1, got {factor!r}: pass e.g. --factor 2")
    value = float(factor)
    if not math.isfinite(value) or value <= 1.0:
        raise CtxextError(
            f"factor must be a finite number > 1 (new length / trained length), got {factor!r}: "
            "pass e.g. --factor 2"
        )
    return value


def validate_request(
    info: RopeInfo, method: str, factor: float | None, target_length: int | None
) -> float:
    """Check that ``method`` can extend this model and return the scale factor s."""
    if method not in ALL_METHODS:
        raise CtxextError(f"unknown method {method!r}: choose one of {', '.join(ALL_METHODS)}")
    refusal = method_refusal(info, method)
    if refusal:
        raise CtxextError(refusal)
    if (factor is None) == (target_length is None):
        raise CtxextError(
            "give exactly one of factor or target length (e.g. --factor 2 or --target-length "
            f"{2 * info.trained_length})"
        )
    if factor is not None:
        return check_factor(factor)
    if isinstance(target_length, bool) or not isinstance(target_length, numbers.Integral):
        raise CtxextError(f"target length must be a whole number of tokens, got {target_length!r}")
    if target_length <= info.trained_length:
        raise CtxextError(
            f"target length {target_length} is not longer than the trained length "
            f"{info.trained_length}: pass a larger --target-length (e.g. {2 * info.trained_length})"
        )
    return int(target_length) / info.trained_length


# --------------------------------------------------------------------------- per-method writers
#
# Each writer turns (info, s, options) into the rope dict for the scaled entry and the
# max_position_embeddings to write. Each has a validator for its options (like transformers'
# _validate_<type>_rope_parameters), so bad options fail before anything is written.


def new_length(trained_length: int, factor: float) -> int:
    """The extended context length: trained length x factor rounded to whole tokens, and always
    longer than the trained length (llama3 warns otherwise).

    The one rule for max_position_embeddings, the tokenizer's model_max_length and every new
    length ctxext reports or trains at.
    """
    return max(round(trained_length * factor), trained_length + 1)


def _new_length(info: RopeInfo, s: float) -> int:
    return new_length(info.trained_length, s)


def _entry(info: RopeInfo, rope_type: str, theta: float | None = None) -> dict:
    entry: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta or info.rope_theta)}
    if info.partial_rotary_factor != 1.0:
        entry["partial_rotary_factor"] = float(info.partial_rotary_factor)
    return entry


def _write_linear(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    # PI divides every frequency by s; transformers never reads max_position_embeddings for it.
    # It stays the trained length because vLLM and SGLang serve max_position_embeddings x factor,
    # except for Gemma 3, where vLLM takes max_position_embeddings as already scaled (Google's
    # own Gemma 3 configs pair linear factor 8 with the extended 131072).
    if info.model_type in GEMMA3:
        return {**_entry(info, "linear"), "factor": s}, _new_length(info, s)
    return {**_entry(info, "linear"), "factor": s}, info.trained_length


def _write_dynamic(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    # transformers reads max_position_embeddings as the ORIGINAL length L in theta' =
    # theta((s*seq/L) - (s-1))^(d/(d-2)); raising it would mean the update never triggers.
    # (So vLLM serves only L for a dynamic Gemma 3: pass --max-model-len there.)
    return {**_entry(info, "dynamic"), "factor": s}, info.trained_length


def _write_ntk(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    # No "ntk" rope_type exists: write the enlarged base under rope_type "default", which every
    # engine reads. No factor/original length inside the dict: "default" accepts neither without
    # an "Unrecognized keys" warning; the trained length goes to the top level instead.
    # A tuned ``theta_multiplier`` replaces bloc97's s ** (d / (d - 2)).
    from ctxext.rope.formulas import ntk_theta  # numpy loads on use: `extend` starts quickly

    multiplier = opts["theta_multiplier"]
    theta = (
        info.rope_theta * multiplier
        if multiplier is not None
        else ntk_theta(info.rope_theta, info.rotary_dim, s)
    )
    return _entry(info, "default", theta), _new_length(info, s)


def _write_yarn(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    entry = {
        **_entry(info, "yarn"),
        "factor": s,
        "original_max_position_embeddings": info.trained_length,
        "beta_fast": float(opts["beta_fast"]),
        "beta_slow": float(opts["beta_slow"]),
    }
    if opts["attention_factor"] is not None:  # else transformers/vLLM use 0.1 ln s + 1
        entry["attention_factor"] = float(opts["attention_factor"])
    # transformers warns unless max_position_embeddings / original == factor.
    return entry, _new_length(info, s)


def _write_llama3(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    entry = {
        **_entry(info, "llama3"),
        "factor": s,
        "low_freq_factor": float(opts["low_freq_factor"]),
        "high_freq_factor": float(opts["high_freq_factor"]),
        "original_max_position_embeddings": info.trained_length,
    }
    return entry, _new_length(info, s)


def _write_longrope(info: RopeInfo, s: float, opts: dict) -> tuple[dict, int]:
    # transformers (``_compute_longrope_parameters``) divides pair j's frequency by
    # long_factor[j] when the sequence is longer than original_max_position_embeddings and by
    # short_factor[j] otherwise. ``factor`` is written so that its default attention factor,
    # sqrt(1 + ln s / ln L), is the one vLLM derives from max_position_embeddings / original;
    # vLLM reads no ``attention_factor`` for longrope, so a tuned one holds in transformers only.
    pairs = info.rotary_dim // 2
    short = opts["short_factor"]
    entry = {
        **_entry(info, "longrope"),
        "factor": s,
        "original_max_position_embeddings": info.trained_length,
        "long_factor": _factor_list("long_factor", opts["long_factor"], pairs),
        "short_factor": [1.0] * pairs
        if short is None
        else _factor_list("short_factor", short, pairs),
    }
    if opts["attention_factor"] is not None:
        entry["attention_factor"] = float(opts["attention_factor"])
    return entry, _new_length(info, s)


def _factor_list(name: str, values: Any, pairs: int) -> list[float]:
    if len(values) != pairs:
        raise CtxextError(
            f"{name} has {len(values)} numbers but this model has {pairs} rotary pairs "
            f"(rotary dimension / 2): give exactly {pairs}"
        )
    return [float(v) for v in values]


def _finite_positive(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise CtxextError(f"{name} must be a finite number > 0, got {value!r}: fix the option")
    return float(value)


def _validate_yarn(opts: dict) -> None:
    fast = _finite_positive("beta_fast", opts["beta_fast"])
    slow = _finite_positive("beta_slow", opts["beta_slow"])
    if fast <= slow:
        raise CtxextError(
            f"beta_fast ({fast}) must be greater than beta_slow ({slow}): the ramp runs from pairs "
            "doing beta_fast turns down to pairs doing beta_slow turns (defaults "
            f"{OPTION_DEFAULTS['beta_fast']:g} and {OPTION_DEFAULTS['beta_slow']:g})"
        )
    if opts["attention_factor"] is not None:
        _finite_positive("attention_factor", opts["attention_factor"])


def _validate_llama3(opts: dict) -> None:
    low = _finite_positive("low_freq_factor", opts["low_freq_factor"])
    high = _finite_positive("high_freq_factor", opts["high_freq_factor"])
    if high <= low:
        raise CtxextError(
            f"high_freq_factor ({high}) must be greater than low_freq_factor ({low}) (defaults "
            f"{OPTION_DEFAULTS['high_freq_factor']:g} and {OPTION_DEFAULTS['low_freq_factor']:g})"
        )


def _validate_ntk(opts: dict) -> None:
    if opts["theta_multiplier"] is not None:
        _finite_positive("theta_multiplier", opts["theta_multiplier"])


def _validate_longrope(opts: dict) -> None:
    if opts["long_factor"] is None:
        raise CtxextError(
            "longrope needs long_factor: a list of rotary_dim/2 rescale factors (--long-factor "
            "FILE, or `ctxext tune` to search them)"
        )
    for name in ("long_factor", "short_factor"):
        values = opts[name]
        if values is None:
            continue
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
            raise CtxextError(f"{name} must be a list of numbers, got {type(values).__name__}")
        for v in values:
            _finite_positive(name, v)
    if opts["attention_factor"] is not None:
        _finite_positive("attention_factor", opts["attention_factor"])


def _validate_nothing(opts: dict) -> None:
    return None


_WRITERS: dict[str, Callable[[RopeInfo, float, dict], tuple[dict, int]]] = {
    "linear": _write_linear,
    "ntk": _write_ntk,
    "yarn": _write_yarn,
    "dynamic": _write_dynamic,
    "llama3": _write_llama3,
    "longrope": _write_longrope,
}
_VALIDATORS: dict[str, Callable[[dict], None]] = {
    "linear": _validate_nothing,
    "ntk": _validate_ntk,
    "yarn": _validate_yarn,
    "dynamic": _validate_nothing,
    "llama3": _validate_llama3,
    "longrope": _validate_longrope,
}


def _method_options(method: str, given: dict) -> dict:
    """Keep the options of ``method``; a changed option that another method owns is an error."""
    for name, value in given.items():
        if name not in OPTIONS_OF[method] and value != OPTION_DEFAULTS[name]:
            owners = " or ".join(m for m, names in OPTIONS_OF.items() if name in names)
            raise CtxextError(
                f"option {name} applies only to method {owners}, not {method}: drop it"
            )
    opts = {name: given[name] for name in OPTIONS_OF[method]}
    _VALIDATORS[method](opts)
    return opts


#: Keys every reader takes from the top level of config.json, never from ``rope_scaling``.
_TOP_LEVEL_KEYS = ("rope_theta", "partial_rotary_factor")


def _legacy_mirror(entry: Mapping[str, Any]) -> dict | None:
    """The ``rope_scaling`` copy for transformers 4.x, vLLM, SGLang, TGI and older llama.cpp.

    It carries ``type`` (old readers) and ``rope_type`` (new) and the scaling keys only:
    ``rope_theta`` and ``partial_rotary_factor`` stay at the top level, where those readers look
    (transformers 4.x logs "Unrecognized keys in `rope_scaling`" for either one on every load).
    transformers 5, which lets ``rope_scaling`` replace ``rope_parameters``, fills both back in
    from the top-level keys (GPT-NeoX: ``rotary_emb_base``/``rotary_pct``), and
    :func:`extend_config` always rewrites those. Static NTK has no scaling to mirror:
    ``rope_scaling: null``, since a ``{"type": "default"}`` mirror breaks readers that expect a
    factor (TGI raises on the type and indexes ["factor"]; older vLLM asserts "factor" in
    rope_scaling).
    """
    if entry["rope_type"] == "default":
        return None
    rest = {k: v for k, v in entry.items() if k not in ("rope_type", *_TOP_LEVEL_KEYS)}
    return {"rope_type": entry["rope_type"], "type": entry["rope_type"], **rest}


def extend_config(
    config: Mapping[str, Any],
    method: str,
    factor: float | None = None,
    target_length: int | None = None,
    *,
    beta_fast: float = OPTION_DEFAULTS["beta_fast"],
    beta_slow: float = OPTION_DEFAULTS["beta_slow"],
    attention_factor: float | None = OPTION_DEFAULTS["attention_factor"],
    low_freq_factor: float = OPTION_DEFAULTS["low_freq_factor"],
    high_freq_factor: float = OPTION_DEFAULTS["high_freq_factor"],
    theta_multiplier: float | None = OPTION_DEFAULTS["theta_multiplier"],
    long_factor: list[float] | None = OPTION_DEFAULTS["long_factor"],
    short_factor: list[float] | None = OPTION_DEFAULTS["short_factor"],
    keep_short: bool = False,
) -> dict:
    """Return a new config dict extended by ``method``; ``config`` is not modified.

    ``keep_short`` writes a fixed-frequency method as longrope factors used only past the
    trained length, with the trained frequencies (short factors 1) up to it
    (:func:`keep_short_entry`).

    Writes v5 ``rope_parameters``, the legacy ``rope_scaling`` mirror, top-level ``rope_theta``
    and ``partial_rotary_factor`` (``rotary_emb_base``/``rotary_pct`` for GPT-NeoX), Gemma 3's
    ``rope_local_base_freq``, ``original_max_position_embeddings`` and the method's
    ``max_position_embeddings``.
    """
    info = analyze(config)
    s = validate_request(info, method, factor, target_length)
    given = {
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "attention_factor": attention_factor,
        "low_freq_factor": low_freq_factor,
        "high_freq_factor": high_freq_factor,
        "theta_multiplier": theta_multiplier,
        "long_factor": long_factor,
        "short_factor": short_factor,
    }
    opts = _method_options(method, given)
    if keep_short:
        check_keep_short(method)
    entry, max_len = _WRITERS[method](info, s, opts)
    if keep_short:
        # As for longrope: the new length, which transformers' default attention factor and
        # vLLM read as max_position_embeddings / original_max_position_embeddings.
        entry, max_len = keep_short_entry(entry, info, s), _new_length(info, s)
    elif info.model_type in LONGROPE_ONLY:
        # Phi-3 / PhiMoE read longrope only: the same frequencies as per-pair factors.
        entry, max_len = _as_longrope(entry, info, s), _new_length(info, s)
    if info.model_type == "phimoe":  # PhiMoE scales cos/sin by these instead (both required)
        from ctxext.rope.formulas import longrope_attention_factor

        scale = entry.get("attention_factor") or longrope_attention_factor(s, info.trained_length)
        entry = {**entry, "short_mscale": float(scale), "long_mscale": float(scale)}

    out = copy.deepcopy(dict(config))
    root = out
    for key in info.config_path:
        root = root[key]
    model_type = info.model_type
    if info.layer_types:
        # Gemma 3: scale full_attention only; sliding_attention (local, short window) is untouched.
        layers = rope_entries(model_type, root)
        layers["full_attention"] = entry
        root["rope_parameters"] = {k: layers[k] for k in sorted(layers, reverse=True)}
        root["rope_local_base_freq"] = float(layers["sliding_attention"]["rope_theta"])
    else:
        root["rope_parameters"] = entry
    mirror = _legacy_mirror(entry)
    if mirror is not None or root.get("rope_scaling") is not None:
        root["rope_scaling"] = mirror
    # The top-level copies complete the mirror for every reader of it (see _legacy_mirror).
    root["rope_theta"] = entry["rope_theta"]
    if model_type == "gpt_neox":
        root["rotary_emb_base"] = entry["rope_theta"]
        root["rotary_pct"] = float(info.partial_rotary_factor)
    elif "partial_rotary_factor" in entry:
        root["partial_rotary_factor"] = entry["partial_rotary_factor"]
    if "head_dim" in root and root["head_dim"] is None:
        # e.g. Mixtral saves head_dim null; transformers' yarn/llama3/longrope maths then read
        # None (getattr with a default) and fail: write the value the model uses.
        root["head_dim"] = int(info.head_dim)
    root["max_position_embeddings"] = int(max_len)
    root["original_max_position_embeddings"] = int(info.trained_length)
    return out


# --------------------------------------------------------------------------- keep short


def check_keep_short(method: str) -> None:
    """Refuse keep_short for a method that keeps the trained frequencies already (dynamic) or
    sets them itself (longrope). (Every model a method can extend takes longrope: a model's
    own refusal is raised by :func:`validate_request` first.)"""
    if method not in KEEP_SHORT_METHODS:
        why = {
            "dynamic": "dynamic NTK already computes the trained frequencies up to the trained "
            "length",
            "longrope": "longrope sets the short factors itself (--short-factor, default 1)",
        }.get(method, f"it applies to {', '.join(KEEP_SHORT_METHODS)} only")
        raise CtxextError(f"keep_short: {why}; drop --keep-short")


def keep_short_entry(entry: Mapping[str, Any], info: RopeInfo, s: float) -> dict:
    """``entry`` (a linear / ntk / yarn / llama3 rope dict) as longrope: its per-pair divisors
    as ``long_factor``, ones as ``short_factor``.

    transformers' longrope picks the long factors for a forward whose positions reach past
    ``original_max_position_embeddings`` and the short ones otherwise, so sequences up to the
    trained length run with exactly the frequencies the model was trained with (Phi-3's
    short/long factors; LongRoPE2 trains both modes at once). The one ``attention_factor``
    applies at every length, so it is the method's own (YaRN: 0.1 ln s + 1, others 1): give
    ``attention_factor=1`` for a short mode identical to the trained model.
    """
    return {**_as_longrope(entry, info, s), "short_factor": [1.0] * (info.rotary_dim // 2)}


def _as_longrope(entry: Mapping[str, Any], info: RopeInfo, s: float) -> dict:
    from ctxext.rope.longrope import method_as_longrope

    return method_as_longrope(
        entry,
        factor=s,
        base_theta=info.rope_theta,
        rotary_dim=info.rotary_dim,
        trained_length=info.trained_length,
    )


# --------------------------------------------------------------------------- dry-run diff

_ABSENT = object()


def config_diff(
    before: Mapping[str, Any], after: Mapping[str, Any]
) -> list[tuple[str, object, object]]:
    """Changed leaves as (dotted.path, old, new); None stands for an absent key.

    Dicts on both sides are compared key by key; anything else (including a dict replacing a
    null) is reported whole at its path.
    """
    out: list[tuple[str, object, object]] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in [*a, *(k for k in b if k not in a)]:
                walk(
                    a.get(key, _ABSENT), b.get(key, _ABSENT), f"{path}.{key}" if path else str(key)
                )
        elif type(a) is not type(b) or a != b:  # keys come from the union: never both absent
            out.append((path, None if a is _ABSENT else a, None if b is _ABSENT else b))

    walk(before, after, "")
    return out
