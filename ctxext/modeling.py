"""Load a causal LM (and its tokenizer) for evaluation or fine-tuning.

A scaling method can be applied in memory: the config dict is rewritten by
:func:`ctxext.rope.extend_config` *before* the model is built, exactly as `extend` would write
it, so evaluating "model + method" and evaluating the extended checkpoint are the same thing.
Safety: remote code runs only with ``trust_remote_code=True``; pickled weights load only with
``allow_pickle=True``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxext import checkpoint, hub, locate, rope
from ctxext.config import ExtendConfig
from ctxext.device import pick_device, resolve_dtype
from ctxext.errors import CtxextError


@dataclass
class LoadedModel:
    """A model ready to run, with what it was built from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: locate.ResolvedModel
    config: dict[str, Any]  # the config dict the model was built from (after any rewrite)
    label: str  # e.g. "stdlib-llama" or "stdlib-llama+yarn x4"
    device: str


#: The attention implementations ctxext loads with (transformers' names); --attn-implementation.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _causal_lm_class(config: Any) -> type | None:
    """transformers' own causal-LM class for ``config`` (None: remote code, or none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(
    config: Any, device: str, dtype: Any, requested: str | None = None
) -> str | None:
    """The attention implementation to load ``config``'s model with (None: remote code decides).

    Unless ``requested``: flash-attention-2 on CUDA in half precision where it is installed and
    the model supports it; else sdpa where the model supports it and computes exactly what its
    eager attention does (not with attention-logit softcapping, Gemma 2's, which sdpa would
    skip); else eager. A requested implementation the model or machine cannot run is refused.
    """
    import torch

    cls = _causal_lm_class(config)
    name = getattr(config, "model_type", "?")
    softcap = getattr(config, "attn_logit_softcapping", None) is not None
    sdpa_ok = cls is not None and bool(getattr(cls, "_supports_sdpa", False)) and not softcap
    flash_ok = (
        cls is not None
        and bool(getattr(cls, "_supports_flash_attn", False))
        and device.startswith("cuda")
        and dtype in (torch.bfloat16, torch.float16)
        and _flash_attn_installed()
    )
    if requested is not None:
        if requested not in ATTN_IMPLEMENTATIONS:
            raise CtxextError(
                f"unknown attention implementation {requested!r}: choose one of "
                f"{', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        if requested == "sdpa" and not sdpa_ok and cls is not None:
            why = "softcaps its attention logits, which sdpa skips" if softcap else "has no sdpa"
            raise CtxextError(
                f"model_type '{name}' {why} in transformers: pass --attn-implementation eager"
            )
        if requested == "flash_attention_2" and not flash_ok and cls is not None:
            raise CtxextError(
                "flash_attention_2 needs a CUDA device, bfloat16/float16, the flash-attn package "
                f"and a model that supports it (model_type '{name}'): pass --attn-implementation "
                "sdpa or eager"
            )
        return requested
    if cls is None:
        return None
    if flash_ok:
        return "flash_attention_2"
    return "sdpa" if sdpa_ok else "eager"


def check_causal_lm(config: dict[str, Any], where: str) -> None:
    archs = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return  # decided without importing transformers' model tables (and torch: 2 s)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config["model_type"] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs:
        return
    raise CtxextError(
        f"{where} is not a causal language model (model_type '{config['model_type']}', "
        f"architectures {archs or 'none'}); ctxext evaluates and fine-tunes decoder-only LMs"
    )


def check_weights(path, allow_pickle: bool) -> bool:
    """Decide whether to load safetensors; refuse pickle-only checkpoints unless allowed."""
    files = checkpoint.weight_files(path)
    if any(f.suffix == ".safetensors" for f in files):
        return True
    pickled = [f.name for f in files if f.name.endswith(checkpoint.PICKLE_SUFFIXES)]
    if pickled and not allow_pickle:
        raise CtxextError(
            f"{path} has only pickled weights ({pickled[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not pickled:
        raise CtxextError(f"{path} has no weight files (*.safetensors); pass a complete model")
    return False


def build_config(
    config_dict: dict[str, Any], trust_remote_code: bool, path: Path | None = None
):  # -> PretrainedConfig
    """The transformers config for ``config_dict`` (which may carry our in-memory rope rewrite).

    Only with ``trust_remote_code`` (and a model folder that declares ``auto_map``) does the
    folder's own configuration code run; its values are then overridden by ``config_dict``.
    """
    from transformers import AutoConfig

    # a deep copy: transformers 5 fills rope_theta etc. into the rope dicts it is given, in place
    data = copy.deepcopy(dict(config_dict))
    model_type = data.pop("model_type")
    if trust_remote_code and path is not None and "AutoConfig" in data.get("auto_map", {}):
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        for key, value in data.items():
            if key not in ("auto_map", "architectures", "transformers_version"):
                setattr(config, key, value)
        return config
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        if trust_remote_code:
            raise
        raise CtxextError(
            f"model_type '{model_type}' is unknown to transformers; it may need remote code "
            "(pass --trust-remote-code if you trust it) or a newer transformers"
        ) from e


def scaled_config(
    source: locate.ResolvedModel,
    extend: ExtendConfig | None = None,
    *,
    rope_as_trained: bool = False,
) -> tuple[dict[str, Any], str]:
    """A resolved model's config dict after the in-memory rewrite, and its row label.

    ``rope_as_trained``: a scaled checkpoint's config with its original rope instead
    (:func:`ctxext.rope.original_config`; refused where the original is not recorded).
    Reads config.json only (no torch, no transformers), so callers can check every model and
    method before anything slow runs.
    """
    config_dict = checkpoint.read_config(source.path)
    check_causal_lm(config_dict, source.name)
    if rope_as_trained:
        original = rope.original_config(config_dict)
        if original is None:
            raise CtxextError(
                f"{source.name}: the config does not record the rope it was trained with"
            )
        changed = original != config_dict
        return original, f"{source.name} (rope as trained)" if changed else source.name
    if extend is None:
        return config_dict, source.name
    info = rope.analyze(config_dict)
    factor = rope.validate_request(info, extend.method, extend.factor, extend.target_length)
    config_dict = rope.extend_config(
        config_dict, extend.method, factor=factor, **extend.rope_options()
    )
    return config_dict, f"{source.name}+{extend.label(factor)}"


def load_causal_lm(
    model: str | locate.ResolvedModel | None,
    *,
    extend: ExtendConfig | None = None,
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: hub.DownloadProgress | None = None,
    tokenizer: Any = None,
    attn_implementation: str | None = None,
    rope_as_trained: bool = False,
) -> LoadedModel:
    """Resolve, check and load a causal LM, optionally with a scaling method applied.

    A Hub model's files are fetched first (``progress`` draws the weight downloads). A model
    already resolved (a :class:`~ctxext.locate.ResolvedModel`) is not resolved again: a
    Hub model's weights are fetched at the commit it was resolved to. ``tokenizer``: the
    model's tokenizer when the caller has loaded it already. ``attn_implementation``: None
    chooses per model (:func:`choose_attn_implementation`). ``rope_as_trained``: a scaled
    checkpoint with its original rope (:func:`scaled_config`), ``extend`` ignored.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(model, locate.ResolvedModel):
        source = locate.fetch(model, "weights", allow_pickle=allow_pickle, progress=progress)
    else:
        source = locate.resolve_model(
            model, "weights", allow_pickle=allow_pickle, progress=progress
        )
    config_dict, label = scaled_config(source, extend, rope_as_trained=rope_as_trained)
    use_safetensors = check_weights(source.path, allow_pickle)
    if tokenizer is None:
        tokenizer = load_tokenizer(source.path, trust_remote_code)
    device = pick_device()
    torch_dtype = resolve_dtype(dtype, device)
    config = build_config(config_dict, trust_remote_code, source.path)
    attn = choose_attn_implementation(config, device, torch_dtype, attn_implementation)
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            source.path,
            config=config,
            dtype=torch_dtype,
            attn_implementation=attn,
            device_map=device_map,
            use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:  # safetensors, torch and transformers each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not checkpoint.weights_readable(source.path):
            raise CtxextError(
                f"could not load the weights of {source.name} ({first}); the weight files may "
                "be truncated or corrupted: re-download or re-create the checkpoint"
            ) from e
        raise CtxextError(
            f"transformers could not build {source.name} (model_type "
            f"'{config_dict.get('model_type')}', attention {attn}): {first}; its weight files "
            "read fine, so check the config, or pass --attn-implementation"
        ) from e
    if device_map is None:
        lm.to(device)
    lm.eval()
    if lm.generation_config is not None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return LoadedModel(lm, tokenizer, source, config_dict, label, device)


def rescale(loaded: LoadedModel, extend: ExtendConfig | None) -> LoadedModel | None:
    """``loaded`` with ``extend``'s rope (None: the unscaled config) instead of its own, its
    weights kept (:func:`swap_rope`); None where that cannot be done exactly: load it afresh."""
    config_dict, label = scaled_config(loaded.source, extend)
    if not swap_rope(loaded.model, loaded.config, config_dict):
        return None
    return LoadedModel(
        loaded.model, loaded.tokenizer, loaded.source, config_dict, label, loaded.device
    )


def swap_rope(model: Any, current: dict[str, Any], new: dict[str, Any]) -> bool:
    """Give a loaded model the rope of config dict ``new`` in place, as if loaded with it.

    ``current`` is the config dict the model has now. The attributes the rewrite changes (as
    transformers reads them: both dicts go through the config class) are set on the model's
    config object, which its modules share, and every rotary embedding module is constructed
    anew from it and assigned through nn.Module's attribute API (the rotary modules hold what
    RoPE scaling changes: inv_freq, the attention scaling, dynamic NTK's and longrope's state).
    Returns False, the model untouched, where that would not equal a fresh load: a model spread
    over devices (accelerate hooks), remote code, a rotary module not built from the config
    alone, or an architecture whose other modules read the rope parameters when built (found
    by building both configs' skeletons on the meta device and comparing their attributes).
    """
    rotary = _rotary_modules(model)
    if not rotary or not _swappable(model, rotary):
        return False
    old_cfg, new_cfg = build_config(current, False), build_config(new, False)
    if not _rope_only_in_rotary(type(model), old_cfg, new_cfg):
        return False
    _copy_changed(model.config, old_cfg, new_cfg)
    for name, module in rotary:
        parent_name, _, child = name.rpartition(".")
        buffer = next(module.buffers(), None)
        fresh = type(module)(config=module.config)
        if buffer is not None:  # where (and in the dtype) the loaded model keeps them
            fresh.to(device=buffer.device, dtype=buffer.dtype)
        model.get_submodule(parent_name).register_module(child, fresh)
    return True


def _rotary_modules(model: Any) -> list[tuple[str, Any]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding")
    ]


def _swappable(model: Any, rotary: list[tuple[str, Any]]) -> bool:
    """One device (no accelerate hooks), transformers' own classes, rotary modules built from
    the model's (text) config alone."""
    import inspect

    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1 or not type(model).__module__.startswith("transformers."):
        return False
    configs = {id(model.config), id(model.config.get_text_config())}
    for _, module in rotary:
        params = list(inspect.signature(type(module).__init__).parameters.values())[1:]
        required = [p.name for p in params if p.default is inspect.Parameter.empty]
        if required != ["config"] or id(getattr(module, "config", None)) not in configs:
            return False
    return True


def _rope_only_in_rotary(model_class: type, old_cfg: Any, new_cfg: Any) -> bool:
    """Whether the two configs build the same modules apart from the rotary ones (the same
    attributes: e.g. DeepSeek's attention scales its softmax by YaRN's mscale when built)."""
    import torch

    with torch.device("meta"):
        old, new = model_class(old_cfg), model_class(new_cfg)
    for a, b in zip(old.modules(), new.modules(), strict=True):
        if not type(a).__name__.endswith("RotaryEmbedding") and _plain(a) != _plain(b):
            return False
    return True


def _plain(module: Any) -> dict[str, Any]:
    """A module's plain attributes (numbers, strings, flags), which its forward reads."""
    kinds = (int, float, str, bool, tuple, type(None))
    return {k: v for k, v in vars(module).items() if isinstance(v, kinds)}


def _copy_changed(target: Any, old: Any, new: Any) -> None:
    """Set on ``target`` (a config object) every attribute where ``new`` differs from ``old``
    (sub-configs, e.g. a text config, recursively: the model's modules hold those objects)."""
    import copy

    from transformers import PretrainedConfig

    for key in vars(old).keys() | vars(new).keys():
        a, b = vars(old).get(key), vars(new).get(key)
        if isinstance(a, PretrainedConfig) and isinstance(b, PretrainedConfig):
            _copy_changed(getattr(target, key), a, b)
        elif key not in vars(new):  # e.g. a key only the scaled config had
            vars(target).pop(key, None)
        elif key not in vars(old) or a != b:
            setattr(target, key, copy.deepcopy(b))


def load_tokenizer(path, trust_remote_code: bool = False):  # -> PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    check_tokenizer_files(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise CtxextError(
            f"could not load the tokenizer of {path} ({type(e).__name__}); check its tokenizer "
            "files"
        ) from e


def check_tokenizer_files(path: Path) -> None:
    """Refuse a model folder without tokenizer files (a cheap check: nothing is loaded)."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((path / n).is_file() for n in names):
        raise CtxextError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model); copy the base "
            "model's tokenizer files into it"
        )
