"""Read a config's position encoding the way transformers 5.x reads it (see :mod:`ctxext.rope`).

:func:`analyze` returns a :class:`RopeInfo`: the scheme (RoPE or why not), theta, head and rotary
dimensions, the trained length, any scaling already present, and the one-line refusal when no
method applies.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ctxext.errors import CtxextError
from ctxext.rope.methods import METHODS

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
LONGROPE_ONLY = frozenset({"phi3", "phimoe"})
GEMMA3 = frozenset({"gemma3_text", "gemma3"})
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
    | GEMMA3
    | LONGROPE_ONLY
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


def _allowed(model_type: str) -> tuple[str, ...]:
    """The factor methods a RoPE model takes: all, except for the longrope-only architectures
    (each method written as longrope factors there; dynamic NTK cannot be)."""
    if model_type in LONGROPE_ONLY:
        from ctxext.rope.longrope import NOT_EXPRESSIBLE

        return tuple(m for m in METHODS if m not in NOT_EXPRESSIBLE)
    return METHODS


def method_refusal(info: RopeInfo, method: str) -> str | None:
    """Why ``method`` cannot extend this model (None: it can), in one line."""
    if info.refusal:
        return info.refusal
    if method in METHODS and method not in info.allowed_methods:
        from ctxext.rope.longrope import NOT_EXPRESSIBLE

        return (
            f"model_type '{info.model_type}' reads only rope_type 'longrope' in transformers, so "
            f"ctxext writes each method as longrope factors, and {NOT_EXPRESSIBLE[method]}: use "
            f"{', '.join(info.allowed_methods)} or longrope"
        )
    return None


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
    if head_dim is None and model_type in GEMMA3:
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


def rope_entries(model_type: str, cfg: Mapping[str, Any]) -> dict[str | None, dict]:
    """The rope dict(s) transformers will use, keyed by layer type (None when flat).

    Mirrors ``convert_rope_params_to_dict``: legacy rope_scaling replaces rope_parameters (flat)
    or is merged into full_attention (Gemma 3); theta/partial fall back to the top-level keys.
    """
    params = cfg.get("rope_parameters")
    legacy = cfg.get("rope_scaling")
    if model_type in GEMMA3 or _is_nested(params):
        if model_type not in GEMMA3:
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
    entries = rope_entries(model_type, cfg)
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

    if existing is not None:
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
        allowed_methods=() if refusal else _allowed(model_type),
        refusal=refusal,
        sliding_rope_theta=float(sliding["rope_theta"]) if sliding else None,
        config_path=path,
    )


# --------------------------------------------------------------------------- sliding windows


def sliding_window(config: Mapping[str, Any], length: int | None = None) -> dict | None:
    """Sliding-window attention in ``config`` and what it means at ``length`` tokens, or None.

    Layers with a window of W tokens attend to the last W positions only, however long the
    context (Mistral, Gemma 2/3's local layers, Qwen2 with ``use_sliding_window``): extending
    the rope does not let them see further; only the other layers (and stacking) reach past W.
    Which layers: ``layer_types`` (transformers 5 writes it) where present, else every layer.
    """
    _, cfg = _text_root(config)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False or not isinstance(window, numbers.Integral):
        return None
    layers = cfg.get("num_hidden_layers")
    types = cfg.get("layer_types")
    sliding = sum(t == "sliding_attention" for t in types) if types else layers
    if not sliding:
        return None
    out: dict[str, Any] = {"window": int(window), "sliding_layers": sliding, "layers": layers}
    if length is not None:
        full = (layers or sliding) - sliding
        reach = (
            "only stacking carries text further back"
            if not full
            else (f"only the other {full} layer(s) attend further back")
        )
        out["note"] = (
            f"at {length} tokens, {sliding} of {layers} layers attend to the last "
            f"{int(window)} tokens only (sliding window), "
            + (reach if length > window else "which here is the whole sequence")
        )
    return out
