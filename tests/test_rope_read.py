"""ctxext.rope.read: which position encoding a config uses, read as transformers reads it, and
the refusals when no method applies."""

from __future__ import annotations

import pytest
from rope_configs import GEMMA3, GEMMA3_LEGACY, LLAMA, LLAMA31, PYTHIA, QWEN2_V5
from rope_configs import one_line_error as _error

from ctxext.rope.methods import METHODS
from ctxext.rope.read import RopeInfo, analyze
from ctxext.rope.write import extend_config, validate_request


def test_analyze_legacy_llama() -> None:
    info = analyze(LLAMA)
    assert info.scheme == "rope"
    assert (info.rope_theta, info.head_dim, info.rotary_dim) == (10000.0, 128, 128)
    assert info.partial_rotary_factor == 1.0
    assert info.trained_length == 4096
    assert info.existing_scaling is None and info.layer_types is None
    assert info.allowed_methods == METHODS and info.refusal is None


def test_analyze_v5_rope_parameters_and_head_dim_key() -> None:
    info = analyze({**QWEN2_V5, "head_dim": 96})
    assert info.rope_theta == 1e6 and info.head_dim == 96 and info.rotary_dim == 96


def test_legacy_rope_scaling_wins_over_rope_parameters() -> None:
    cfg = {**QWEN2_V5, "rope_scaling": {"type": "linear", "factor": 4}}
    info = analyze(cfg)
    assert info.existing_scaling == {
        "rope_type": "linear",
        "type": "linear",
        "factor": 4,
        "rope_theta": 10000.0,
    }
    # theta comes from the top-level rope_theta (default 10000), not from rope_parameters
    assert info.rope_theta == 10000.0
    assert "linear" in _error(validate_request, info, "yarn", 2.0, None)


def test_top_level_theta_only_fills_in() -> None:
    cfg = {**QWEN2_V5, "rope_theta": 5.0}  # rope_parameters' own theta wins
    assert analyze(cfg).rope_theta == 1e6


def test_gpt_neox_partial_rotary() -> None:
    info = analyze(PYTHIA)
    assert info.head_dim == 64 and info.partial_rotary_factor == 0.25 and info.rotary_dim == 16
    assert info.rope_theta == 10000.0
    v5_saved = {k: v for k, v in PYTHIA.items() if k not in ("rotary_pct", "rotary_emb_base")} | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    }
    assert analyze(v5_saved).rotary_dim == 32
    default_pct = {k: v for k, v in PYTHIA.items() if k != "rotary_pct"}
    assert analyze(default_pct).rotary_dim == 16  # GPTNeoXConfig's default rotary_pct is 0.25


def test_top_level_partial_rotary_factor() -> None:
    cfg = {**LLAMA, "model_type": "phi", "partial_rotary_factor": 0.5}
    info = analyze(cfg)
    assert info.partial_rotary_factor == 0.5 and info.rotary_dim == 64


@pytest.mark.parametrize("cfg", [GEMMA3, GEMMA3_LEGACY], ids=["v5", "legacy"])
def test_gemma3_nested(cfg: dict) -> None:
    info = analyze(cfg)
    assert info.layer_types == ("full_attention", "sliding_attention")
    assert info.rope_theta == 1e6 and info.sliding_rope_theta == 1e4
    assert info.head_dim == 256 and info.rotary_dim == 256


def test_gemma3_multimodal_wrapper() -> None:
    cfg = {"model_type": "gemma3", "text_config": GEMMA3, "vision_config": {"hidden_size": 8}}
    info = analyze(cfg)
    assert info.config_path == ("text_config",) and info.model_type == "gemma3_text"
    out = extend_config(cfg, "yarn", 4.0)
    assert out["vision_config"] == cfg["vision_config"]
    assert out["text_config"]["rope_parameters"]["full_attention"]["rope_type"] == "yarn"
    assert "rope_parameters" not in out and "max_position_embeddings" not in out


def test_trained_length_prefers_original_max_position_embeddings() -> None:
    info = analyze(LLAMA31)
    assert info.trained_length == 8192 and info.max_position_embeddings == 131072
    assert info.existing_scaling["rope_type"] == "llama3"


NON_ROPE = [
    ({"model_type": "gpt2", "n_positions": 1024}, "learned", "learned"),
    ({"model_type": "bert", "max_position_embeddings": 512}, "learned", "learned"),
    ({"model_type": "opt", "max_position_embeddings": 2048}, "learned", "learned"),
    ({"model_type": "gpt_bigcode", "n_positions": 8192}, "learned", "learned"),
    ({"model_type": "gpt_neo", "max_position_embeddings": 2048}, "learned", "learned"),
    ({"model_type": "bloom"}, "alibi", "ALiBi"),
    ({"model_type": "mpt", "max_seq_len": 2048}, "alibi", "ALiBi"),
    ({"model_type": "falcon", "alibi": True, "max_position_embeddings": 2048}, "alibi", "ALiBi"),
    ({"model_type": "mamba"}, "none", "no position embeddings"),
    ({"model_type": "t5"}, "relative", "relative"),
    ({"model_type": "gptj", "rotary_dim": 64, "n_positions": 2048}, "rotary_dim", "rotary_dim"),
    ({"model_type": "codegen", "rotary_dim": 32, "n_positions": 2048}, "rotary_dim", "rotary_dim"),
    ({"model_type": "mystery", "n_positions": 512}, "learned", "learned"),
    ({"model_type": "mystery"}, "unknown", "cannot tell"),
]


@pytest.mark.parametrize(
    ("cfg", "scheme", "words"), NON_ROPE, ids=[c[0]["model_type"] for c in NON_ROPE]
)
@pytest.mark.parametrize("method", METHODS)
def test_non_rope_schemes_refused(cfg: dict, scheme: str, words: str, method: str) -> None:
    info = analyze(cfg)
    assert info.scheme == scheme and info.allowed_methods == ()
    message = _error(validate_request, info, method, 2.0, None)
    assert words in message and cfg["model_type"] in message
    _error(extend_config, cfg, method, 2.0)


def test_falcon_without_alibi_is_rope() -> None:
    cfg = {"model_type": "falcon", "alibi": False, "hidden_size": 64, "num_attention_heads": 4,
           "max_position_embeddings": 2048, "rope_theta": 10000.0}  # fmt: skip
    assert analyze(cfg).scheme == "rope"


def test_unknown_model_with_rope_keys_is_rope() -> None:
    cfg = {**LLAMA, "model_type": "my_llama_clone"}
    assert analyze(cfg).scheme == "rope"


def test_phi3_refuses_only_dynamic() -> None:  # the rest: test_rope_longrope.py
    cfg = {**LLAMA, "model_type": "phi3", "original_max_position_embeddings": 4096}
    message = _error(extend_config, cfg, "dynamic", 2.0)
    assert "longrope" in message and "phi3" in message


@pytest.mark.parametrize("method", METHODS)
def test_already_scaled_refused(method: str) -> None:
    message = _error(extend_config, LLAMA31, method, 2.0)
    assert "already scaled" in message and "llama3" in message


def test_type_alias_counts_as_existing_scaling() -> None:
    cfg = {**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    assert "dynamic" in _error(extend_config, cfg, "linear", 2.0)


def test_factor_one_linear_is_not_scaling() -> None:
    cfg = {**LLAMA, "rope_scaling": {"type": "linear", "factor": 1.0}}
    assert analyze(cfg).refusal is None
    assert extend_config(cfg, "yarn", 2.0)["rope_scaling"]["type"] == "yarn"


@pytest.mark.parametrize("method", METHODS)
def test_extended_config_cannot_be_extended_again(method: str) -> None:
    once = extend_config(LLAMA, method, 2.0)
    assert "already scaled" in _error(extend_config, once, "linear", 2.0)


def test_mrope_keys_refused() -> None:
    cfg = {**QWEN2_V5, "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24]}}
    assert "mrope_section" in _error(extend_config, cfg, "yarn", 2.0)


def test_non_dict_and_incomplete_configs() -> None:
    _error(analyze, ["not", "a", "dict"])
    _error(analyze, {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"})
    _error(analyze, {k: v for k, v in LLAMA.items() if k != "num_attention_heads"})
    _error(analyze, {**LLAMA, "max_position_embeddings": "4096"})


def test_odd_rotary_dim_refused() -> None:
    cfg = {**LLAMA, "partial_rotary_factor": 0.01}  # int(128 * 0.01) = 1
    assert "rotary dimension" in _error(extend_config, cfg, "yarn", 2.0)


def test_ropeinfo_is_frozen() -> None:
    info = analyze(LLAMA)
    assert isinstance(info, RopeInfo)
    with pytest.raises(AttributeError):
        info.rope_theta = 1.0  # type: ignore[misc]
