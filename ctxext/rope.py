"""Read a Hugging Face config's RoPE setup and rewrite it for a longer context.

Pure functions on plain dicts (a parsed ``config.json``); no model, no torch.

How transformers 5.x reads what we write (``modeling_rope_utils.py`` and the config classes):

* ``rope_parameters`` is the v5 home: ``{rope_type, rope_theta, factor, ...}``.
* A legacy ``rope_scaling`` key, when truthy, REPLACES ``rope_parameters`` wholesale on load
  (``rope_scaling or rope_parameters``); the top-level ``rope_theta`` / ``partial_rotary_factor``
  are then only ``setdefault``-ed into it. A mirror without ``rope_theta`` plus a stale top-level
  ``rope_theta`` therefore silently changes theta, so our mirror carries ``rope_theta`` (and
  ``partial_rotary_factor``) itself and the top-level copies are rewritten to match.
* GPT-NeoX reads theta from ``rotary_emb_base`` and the rotary share from ``rotary_pct``
  (default 0.25), never from top-level ``rope_theta``.
* Gemma 3 nests ``{sliding_attention: {...}, full_attention: {...}}``; a legacy ``rope_scaling``
  is merged (``dict.update``) into ``full_attention`` only; top-level ``rope_theta`` feeds
  full_attention and ``rope_local_base_freq`` feeds sliding_attention.
* Each rope_type has a validator that warns about keys it does not know: ``default`` accepts only
  ``rope_theta``/``partial_rotary_factor``, ``linear`` and ``dynamic`` add ``factor``. So the
  trained length goes into ``rope_parameters`` only for ``yarn`` and ``llama3`` (which require
  it) and at the top level (``original_max_position_embeddings``) always; for flat configs
  transformers prefers that top-level value for yarn/llama3/longrope, so both must agree.
* YaRN reads ``truncate`` from the top of ``rope_parameters``, so inside a nested (Gemma 3)
  entry it is ignored; we never write it (the default, floor/ceil, is the paper's code).
* There is no ``ntk`` rope_type (it loads with a warning, then the model fails to build): static
  NTK is written as ``rope_type: default`` with the enlarged theta.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ctxext.errors import CtxextError

METHODS = ("linear", "ntk", "yarn", "dynamic", "llama3")
#: Methods that need more than a factor: longrope takes searched (or given) per-pair factors.
FACTOR_LIST_METHODS = ("longrope",)
ALL_METHODS = METHODS + FACTOR_LIST_METHODS


def _ref() -> Any:
    """The reference formulas (numpy) load on first use: `extend` stays quick to start."""
    from ctxext import rope_reference

    return rope_reference


_PICK = "pick a RoPE model (Llama, Mistral, Qwen2, GPT-NeoX, Gemma 3, ...)"

# Position-encoding families that rope scaling cannot help, by model_type.
_LEARNED = frozenset(
    [
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "opt",
        "bert",
        "roberta",
        "xlm-roberta",
        "xlm",
        "distilbert",
        "electra",
        "albert",
        "camembert",
        "biogpt",
        "bart",
        "mbart",
        "whisper",
        "blenderbot",
        "xglm",
        "ctrl",
        "imagegpt",
        "megatron-bert",
        "layoutlm",
    ]
)
_ALIBI = frozenset({"bloom", "mpt"})
_FALCON = frozenset({"falcon", "RefinedWeb", "RefinedWebModel"})  # ALiBi only when alibi: true
_NO_POSITIONS = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "jamba"})
_RELATIVE = frozenset({"t5", "mt5", "umt5", "longt5", "deberta", "deberta-v2", "transfo-xl"})
_ROTARY_DIM = frozenset({"gptj", "codegen"})
_LONGROPE_ONLY = frozenset({"phi3", "phimoe"})
_GEMMA3 = frozenset({"gemma3_text", "gemma3"})
_ROPE = (
    frozenset(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gpt_neox",
            "phi",
            "stablelm",
            "starcoder2",
            "olmo",
            "olmo2",
            "cohere",
            "granite",
            "persimmon",
            "internlm2",
            "exaone",
            "falcon",
        ]
    )
    | _GEMMA3
    | _LONGROPE_ONLY
)

# Keys a plain (unscaled) rope dict may carry; anything else is a variant we cannot rescale.
_PLAIN_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})


@dataclass(frozen=True)
class RopeInfo:
    """What a config says about positions, read the way transformers 5.x reads it.

    For schemes other than "rope" the numeric fields are 0 where they do not apply.
    ``rope_theta`` is the theta of the entry ctxext would scale (``full_attention`` for Gemma 3).
    ``config_path`` is where the text model's keys live (``("text_config",)`` for multimodal
    Gemma 3). ``refusal`` is the one-line reason no method applies, or None.
    """

    model_type: str
    scheme: str  # "rope", "alibi", "learned", "relative", "none", "rotary_dim", "unknown"
    rope_theta: float
    head_dim: int
    rotary_dim: int
    partial_rotary_factor: float
    trained_length: int
    max_position_embeddings: int
    existing_scaling: dict | None = field(default=None, hash=False)  # hash() stays usable
    layer_types: tuple[str, ...] | None = None
    allowed_methods: tuple[str, ...] = ()
    refusal: str | None = None
    sliding_rope_theta: float | None = None
    config_path: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- reading a config


def _text_root(config: Mapping[str, Any]) -> tuple[tuple[str, ...], Mapping[str, Any]]:
    """Multimodal wrappers (e.g. model_type 'gemma3') keep the language model in text_config."""
    text = config.get("text_config")
    own_keys = ("num_attention_heads", "rope_theta", "rope_parameters", "rope_scaling")
    if isinstance(text, Mapping) and not any(k in config for k in own_keys):
        return ("text_config",), text
    return (), config


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def _is_nested(params: Any) -> bool:
    """Per-layer-type rope dicts: every value is a dict (or None), no rope keys at the top."""
    return (
        isinstance(params, Mapping)
        and bool(params)
        and all(isinstance(v, Mapping) or v is None for v in params.values())
    )


def _scheme(model_type: str, cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """Classify the position encoding and, if it is not RoPE, say why nothing applies."""
    has_rope_keys = any(k in cfg for k in ("rope_theta", "rope_parameters", "rope_scaling"))
    if model_type in _LEARNED:
        why = "uses learned absolute position embeddings, not RoPE"
        return (
            "learned",
            f"model_type '{model_type}' {why}: context extension by rope scaling does not apply; {_PICK}",
        )
    if model_type in _ALIBI or (model_type in _FALCON and cfg.get("alibi")):
        why = "uses ALiBi attention biases, not RoPE"
        return (
            "alibi",
            f"model_type '{model_type}' {why}: rope scaling does not apply (ALiBi needs no config change to run longer); {_PICK}",
        )
    if model_type in _NO_POSITIONS:
        why = "has no position embeddings (recurrent/state-space layers)"
        return "none", f"model_type '{model_type}' {why}: rope scaling does not apply; {_PICK}"
    if model_type in _RELATIVE:
        why = "uses relative position buckets/biases, not RoPE"
        return "relative", f"model_type '{model_type}' {why}: rope scaling does not apply; {_PICK}"
    if model_type in _ROTARY_DIM or ("rotary_dim" in cfg and not has_rope_keys):
        why = "applies RoPE over a fixed `rotary_dim` and transformers reads no rope scaling from its config"
        return (
            "rotary_dim",
            f"model_type '{model_type}' {why}: a rewritten config would be ignored; {_PICK}",
        )
    if model_type in _ROPE or has_rope_keys:
        return "rope", None
    if cfg.get("position_embedding_type") == "absolute" or "n_positions" in cfg:
        why = (
            "looks like it uses learned absolute positions (n_positions / position_embedding_type)"
        )
        return (
            "learned",
            f"model_type '{model_type}' {why}, not RoPE: rope scaling does not apply; {_PICK}",
        )
    why = "has no rope_theta, rope_parameters or rope_scaling in its config"
    return "unknown", f"cannot tell whether model_type '{model_type}' uses RoPE: it {why}; {_PICK}"


def _positive_int(cfg: Mapping[str, Any], key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise CtxextError(
            f"config field {key} is {value!r}, expected a positive integer: fix config.json "
            f"(model_type '{cfg.get('model_type')}')"
        )
    return int(value)


def _head_dim(model_type: str, cfg: Mapping[str, Any]) -> int:
    head_dim = cfg.get("head_dim")
    if head_dim is None and model_type in _GEMMA3:
        head_dim = 256  # Gemma3TextConfig's default when the key is absent
    if head_dim is not None:
        return _positive_int(cfg, "head_dim", head_dim)
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if hidden is None or heads is None:
        raise CtxextError(
            "config has neither head_dim nor hidden_size and num_attention_heads: cannot size the "
            "rotary embedding; pass a complete config.json"
        )
    return _positive_int(cfg, "hidden_size", hidden) // _positive_int(
        cfg, "num_attention_heads", heads
    )


def _rope_entries(model_type: str, cfg: Mapping[str, Any]) -> dict[str | None, dict]:
    """The rope dict(s) transformers will use, keyed by layer type (None when flat).

    Mirrors ``convert_rope_params_to_dict``: legacy rope_scaling replaces rope_parameters (flat)
    or is merged into full_attention (Gemma 3); theta/partial fall back to the top-level keys.
    """
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if model_type in _GEMMA3 or _is_nested(params):
        if model_type not in _GEMMA3:
            raise CtxextError(
                f"model_type '{model_type}' has per-layer-type rope_parameters ({sorted(params)}) and "
                "ctxext only knows how transformers loads those for Gemma 3; pick a model with one "
                "rope_parameters dict or Gemma 3"
            )
        nested = copy.deepcopy(dict(params)) if _is_nested(params) else {}
        full = nested.get("full_attention") or {"rope_type": "default"}
        sliding = nested.get("sliding_attention") or {"rope_type": "default"}
        if legacy is not None:
            full.update(legacy)
        full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        sliding.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
        return {"full_attention": full, "sliding_attention": sliding}
    entry = copy.deepcopy(dict(legacy or params or {}))
    if model_type == "gpt_neox":
        entry.setdefault("rope_theta", cfg.get("rotary_emb_base", 10_000.0))
        entry.setdefault("partial_rotary_factor", cfg.get("rotary_pct", 0.25))
    else:
        entry.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
        if cfg.get("partial_rotary_factor") is not None:
            entry.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    return {None: entry}


def _rope_type(entry: Mapping[str, Any]) -> str:
    return str(entry.get("rope_type", entry.get("type", "default")))


def _is_noop(entry: Mapping[str, Any]) -> bool:
    """Unscaled: rope_type default, or linear/dynamic with factor 1 (seen in the wild)."""
    kind = _rope_type(entry)
    return kind == "default" or (kind in ("linear", "dynamic") and entry.get("factor") == 1)


def _existing_scaling(cfg: Mapping[str, Any], entries: Mapping[str | None, dict]) -> dict | None:
    """A scaled entry (rope_type other than default), or our own static-NTK marker."""
    for entry in entries.values():
        if not _is_noop(entry):
            return {"rope_type": _rope_type(entry), **entry}
    original = cfg.get("original_max_position_embeddings")
    current = cfg.get("max_position_embeddings")
    if isinstance(original, int) and isinstance(current, int) and original < current:
        # A default rope_type with a recorded shorter trained length: a static NTK rewrite.
        return {
            "rope_type": "default",
            "original_max_position_embeddings": original,
            "max_position_embeddings": current,
        }
    return None


def _describe_existing(existing: Mapping[str, Any]) -> str:
    keys = ("rope_type", "factor", "original_max_position_embeddings")
    return ", ".join(f"{k} {existing[k]}" for k in keys if k in existing)


def analyze(config: Mapping[str, Any]) -> RopeInfo:
    """Read positions, theta, head/rotary dims and trained length from a config dict."""
    if not isinstance(config, Mapping):
        raise CtxextError(
            f"expected a config dict (parsed config.json), got {type(config).__name__}"
        )
    path, cfg = _text_root(config)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    scheme, refusal = _scheme(model_type, cfg)
    mpe = _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    if scheme != "rope":
        rotary = cfg.get("rotary_dim") if scheme == "rotary_dim" else 0
        length = int(mpe) if isinstance(mpe, numbers.Integral) else 0
        return RopeInfo(
            model_type=model_type,
            scheme=scheme,
            rope_theta=0.0,
            head_dim=0,
            rotary_dim=int(rotary or 0),
            partial_rotary_factor=0.0,
            trained_length=length,
            max_position_embeddings=length,
            refusal=refusal,
            config_path=path,
        )
    if cfg.get("max_position_embeddings") is None:
        raise CtxextError(
            f"model_type '{model_type}' config has no max_position_embeddings: add the context "
            "length the model was trained with to config.json"
        )
    mpe = _positive_int(cfg, "max_position_embeddings", cfg["max_position_embeddings"])
    head_dim = _head_dim(model_type, cfg)
    entries = _rope_entries(model_type, cfg)
    main = entries.get("full_attention", entries.get(None))
    theta = float(main["rope_theta"])
    partial = float(main.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * partial)  # transformers: int(head_dim * partial_rotary_factor)
    original = cfg.get("original_max_position_embeddings") or main.get(
        "original_max_position_embeddings"
    )
    trained = _positive_int(cfg, "original_max_position_embeddings", original) if original else mpe
    existing = _existing_scaling(cfg, entries)
    layer_types = tuple(sorted(k for k in entries if k is not None)) or None
    sliding = entries.get("sliding_attention")

    if model_type in _LONGROPE_ONLY:
        refusal = (
            f"model_type '{model_type}' supports only rope_type 'longrope' (searched per-pair factor "
            f"lists) in transformers, not {'/'.join(METHODS)}: use a released long-context "
            "checkpoint of it (e.g. Phi-3-mini-128k-instruct) instead"
        )
    elif existing is not None:
        refusal = (
            f"config is already scaled ({_describe_existing(existing)}): stacking a second scaling "
            "is not supported; start from the base model's original config.json"
        )
    elif not math.isfinite(theta) or theta <= 1.0:
        refusal = f"rope_theta is {theta!r}, expected a finite number > 1: fix config.json"
    elif rotary_dim < 4 or rotary_dim % 2:
        refusal = (
            f"rotary dimension {rotary_dim} (head_dim {head_dim} x partial_rotary_factor {partial}) "
            "is not an even number >= 4: check head_dim and partial_rotary_factor in config.json"
        )
    else:
        ignored = _PLAIN_KEYS | {"original_max_position_embeddings", "factor"}
        unknown = sorted(set(main) - ignored)
        if unknown:
            refusal = (
                f"the rope parameters carry keys ctxext cannot rescale ({', '.join(unknown)}): "
                "custom or multimodal RoPE variants are not supported; pick a text-only RoPE model"
            )
    return RopeInfo(
        model_type=model_type,
        scheme="rope",
        rope_theta=theta,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        partial_rotary_factor=partial,
        trained_length=trained,
        max_position_embeddings=mpe,
        existing_scaling=existing,
        layer_types=layer_types,
        allowed_methods=() if refusal else METHODS,
        refusal=refusal,
        sliding_rope_theta=float(sliding["rope_theta"]) if sliding else None,
        config_path=path,
    )


# --------------------------------------------------------------------------- validating a request


def _check_factor(factor: Any) -> float:
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
    if info.refusal:
        raise CtxextError(info.refusal)
    if (factor is None) == (target_length is None):
        raise CtxextError(
            "give exactly one of factor or target length (e.g. --factor 2 or --target-length "
            f"{2 * info.trained_length})"
        )
    if factor is not None:
        return _check_factor(factor)
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
    if info.model_type in _GEMMA3:
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
    multiplier = opts["theta_multiplier"]
    theta = (
        info.rope_theta * multiplier
        if multiplier is not None
        else _ref().ntk_theta(info.rope_theta, info.rotary_dim, s)
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
            "doing beta_fast turns down to pairs doing beta_slow turns (defaults 32 and 1)"
        )
    if opts["attention_factor"] is not None:
        _finite_positive("attention_factor", opts["attention_factor"])


def _validate_llama3(opts: dict) -> None:
    low = _finite_positive("low_freq_factor", opts["low_freq_factor"])
    high = _finite_positive("high_freq_factor", opts["high_freq_factor"])
    if high <= low:
        raise CtxextError(
            f"high_freq_factor ({high}) must be greater than low_freq_factor ({low}) (defaults 4 and 1)"
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
_OPTION_DEFAULTS = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": None,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "theta_multiplier": None,
    "long_factor": None,
    "short_factor": None,
}
_OPTIONS_OF = {
    "linear": (),
    "ntk": ("theta_multiplier",),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor", "attention_factor"),
}


def _method_options(method: str, given: dict) -> dict:
    """Keep the options of ``method``; a changed option that another method owns is an error."""
    for name, value in given.items():
        if name not in _OPTIONS_OF[method] and value != _OPTION_DEFAULTS[name]:
            owners = " or ".join(m for m, names in _OPTIONS_OF.items() if name in names)
            raise CtxextError(
                f"option {name} applies only to method {owners}, not {method}: drop it"
            )
    opts = {name: given[name] for name in _OPTIONS_OF[method]}
    _VALIDATORS[method](opts)
    return opts


def _legacy_mirror(entry: Mapping[str, Any]) -> dict | None:
    """The ``rope_scaling`` copy for transformers 4.x, vLLM, SGLang, TGI, llama.cpp.

    It carries ``type`` (old readers) and ``rope_type`` (new), and the whole entry including
    rope_theta: transformers 5 lets it replace rope_parameters, so it must be complete.
    Static NTK has no scaling to mirror: ``rope_scaling: null``, since a ``{"type": "default"}``
    mirror breaks readers that expect a factor (TGI raises on the type and indexes ["factor"];
    older vLLM asserts "factor" in rope_scaling).
    """
    if entry["rope_type"] == "default":
        return None
    rest = {k: v for k, v in entry.items() if k != "rope_type"}
    return {"rope_type": entry["rope_type"], "type": entry["rope_type"], **rest}


def extend_config(
    config: Mapping[str, Any],
    method: str,
    factor: float | None = None,
    target_length: int | None = None,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    theta_multiplier: float | None = None,
    long_factor: list[float] | None = None,
    short_factor: list[float] | None = None,
) -> dict:
    """Return a new config dict extended by ``method``; ``config`` is not modified.

    Writes v5 ``rope_parameters``, the legacy ``rope_scaling`` mirror, top-level ``rope_theta``
    (and ``rotary_emb_base``/``rotary_pct`` for GPT-NeoX, ``rope_local_base_freq`` for Gemma 3),
    ``original_max_position_embeddings`` and the method's ``max_position_embeddings``.
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
    entry, max_len = _WRITERS[method](info, s, opts)

    out = copy.deepcopy(dict(config))
    root = out
    for key in info.config_path:
        root = root[key]
    model_type = info.model_type
    if info.layer_types:
        # Gemma 3: scale full_attention only; sliding_attention (local, short window) is untouched.
        layers = _rope_entries(model_type, root)
        layers["full_attention"] = entry
        root["rope_parameters"] = {k: layers[k] for k in sorted(layers, reverse=True)}
        root["rope_local_base_freq"] = float(layers["sliding_attention"]["rope_theta"])
    else:
        root["rope_parameters"] = entry
    mirror = _legacy_mirror(entry)
    if mirror is not None or root.get("rope_scaling") is not None:
        root["rope_scaling"] = mirror
    root["rope_theta"] = entry["rope_theta"]
    if model_type == "gpt_neox":
        root["rotary_emb_base"] = entry["rope_theta"]
        root["rotary_pct"] = float(info.partial_rotary_factor)
    root["max_position_embeddings"] = int(max_len)
    root["original_max_position_embeddings"] = int(info.trained_length)
    return out


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


# --------------------------------------------------------------------------- inspect


def _require_rope(info: RopeInfo) -> None:
    if info.scheme != "rope" or info.rotary_dim < 4:
        raise CtxextError(
            info.refusal or f"model_type '{info.model_type}' has no usable RoPE to inspect"
        )


def _regime(stretch: float, s: float) -> str:
    """How a pair's wavelength changed: kept (extrapolated), x s (interpolated), or between."""
    if math.isclose(stretch, 1.0, rel_tol=1e-9):
        return "extrapolated"
    if math.isclose(stretch, s, rel_tol=1e-9):
        return "interpolated"
    return "blended"


def pair_table(
    info: RopeInfo,
    target_length: int,
    methods: tuple[str, ...] | list[str] = METHODS,
    factor: float | None = None,
) -> list[dict]:
    """One row per rotary pair: wavelength, turns within training, and each method's effect.

    ``factor`` defaults to target_length / trained_length. Each row's ``methods[m]`` holds the new
    wavelength, its stretch (new / old), turns within the target length and a regime:
    "extrapolated" (unchanged), "interpolated" (x s) or "blended"; yarn and llama3 also give
    ``ramp`` (their interpolation weight, 0 = kept, 1 = divided by s). Dynamic is shown at
    seq_len = target_length.
    """
    _require_rope(info)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CtxextError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    s = _check_factor(factor) if factor is not None else target_length / info.trained_length
    if factor is None and target_length <= info.trained_length:
        raise CtxextError(
            f"target length {target_length} is not longer than the trained length "
            f"{info.trained_length}: pass a larger target length"
        )
    theta, d, length = info.rope_theta, info.rotary_dim, info.trained_length
    base = _ref().default_inv_freq(theta, d)
    ramps = {
        "yarn": _ref().yarn_ramp(theta, d, length),
        "llama3": _ref().llama3_blend(theta, d, length),
    }
    scaled = {
        m: _ref().reference_inv_freq(
            m, theta, d, s, length, seq_len=target_length if m == "dynamic" else None
        )[0]
        for m in methods
    }
    rows = []
    for j, inv in enumerate(base):
        wavelength = 2 * math.pi / float(inv)
        row: dict[str, Any] = {
            "pair": j,
            "inv_freq": float(inv),
            "wavelength": wavelength,
            "turns_in_trained": length / wavelength,
            "completes_turn": bool(wavelength <= length),
            "methods": {},
        }
        for m in methods:
            new_wavelength = 2 * math.pi / float(scaled[m][j])
            stretch = new_wavelength / wavelength
            cell = {
                "wavelength": new_wavelength,
                "stretch": stretch,
                "turns_at_target": target_length / new_wavelength,
                "regime": _regime(stretch, s),
            }
            if m in ramps:
                cell["ramp"] = float(ramps[m][j])
            row["methods"][m] = cell
        rows.append(row)
    return rows


def summarize(info: RopeInfo) -> dict:
    """JSON-ready summary for ``ctxext inspect``: scheme, theta, dims, lengths, turn counts."""
    out: dict[str, Any] = {
        "model_type": info.model_type,
        "scheme": info.scheme,
        "rope_theta": info.rope_theta,
        "head_dim": info.head_dim,
        "rotary_dim": info.rotary_dim,
        "partial_rotary_factor": info.partial_rotary_factor,
        "trained_length": info.trained_length,
        "max_position_embeddings": info.max_position_embeddings,
        "layer_types": list(info.layer_types) if info.layer_types else None,
        "sliding_rope_theta": info.sliding_rope_theta,
        "existing_scaling": info.existing_scaling,
        "allowed_methods": list(info.allowed_methods),
        "refusal": info.refusal,
        "pairs": None,
        "pairs_completing_turn": None,
        "pairs_never_completing_turn": None,
    }
    if info.scheme == "rope" and info.rotary_dim >= 4 and info.rotary_dim % 2 == 0:
        wavelengths = 2 * math.pi / _ref().default_inv_freq(info.rope_theta, info.rotary_dim)
        complete = int((wavelengths <= info.trained_length).sum())
        out["pairs"] = info.rotary_dim // 2
        out["pairs_completing_turn"] = complete
        out["pairs_never_completing_turn"] = info.rotary_dim // 2 - complete
    return out
