"""Unit tests of ctxext.rope: reading configs, refusing bad requests, writing extended configs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxext.errors import CtxextError
from ctxext.rope import (
    ALL_METHODS,
    METHODS,
    RopeInfo,
    analyze,
    config_diff,
    extend_config,
    pair_table,
    summarize,
    validate_request,
)
from ctxext.rope_reference import (
    ntk_theta,
    reference_inv_freq,
    yarn_correction_range,
    yarn_ramp,
)

LLAMA = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": None,
}
QWEN2_V5 = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_attention_heads": 14,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
PYTHIA = {
    "model_type": "gpt_neox",
    "hidden_size": 512,
    "num_attention_heads": 8,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
}
GEMMA3 = {
    "model_type": "gemma3_text",
    "hidden_size": 1152,
    "num_attention_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 32768,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}
GEMMA3_LEGACY = {  # transformers 4.x style, e.g. google/gemma-3-1b-pt
    "model_type": "gemma3_text",
    "hidden_size": 1152,
    "num_attention_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
}
LLAMA31 = {
    **LLAMA,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(CtxextError) as caught:
        fn(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


# --------------------------------------------------------------------------- analyze


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


def test_summarize_counts_pairs() -> None:
    summary = summarize(analyze(LLAMA))
    json.dumps(summary)
    assert summary["pairs"] == 64
    wavelengths = 2 * math.pi * 10000.0 ** (np.arange(64) * 2 / 128)
    assert summary["pairs_completing_turn"] == int((wavelengths <= 4096).sum())
    assert summary["pairs_completing_turn"] + summary["pairs_never_completing_turn"] == 64
    assert summarize(analyze({"model_type": "gpt2", "n_positions": 1024}))["pairs"] is None


# --------------------------------------------------------------------------- refusals

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


@pytest.mark.parametrize("method", METHODS)
def test_phi3_refused_for_every_method(method: str) -> None:
    cfg = {**LLAMA, "model_type": "phi3", "original_max_position_embeddings": 4096}
    message = _error(extend_config, cfg, method, 2.0)
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


def test_unknown_method_lists_valid_ones() -> None:
    message = _error(validate_request, analyze(LLAMA), "ntk-by-parts", 2.0, None)
    assert all(m in message for m in ALL_METHODS) and "longrope" in message


@pytest.mark.parametrize(
    ("factor", "target"),
    [(None, None), (2.0, 8192)],
    ids=["neither", "both"],
)
def test_exactly_one_of_factor_and_target(factor, target) -> None:
    assert "exactly one" in _error(validate_request, analyze(LLAMA), "yarn", factor, target)


@pytest.mark.parametrize("bad", [0, 1, 1.0, -2.0, 0.5, math.nan, math.inf, -math.inf, True, "2"])
def test_bad_factor(bad) -> None:
    assert "factor" in _error(validate_request, analyze(LLAMA), "linear", bad, None)


@pytest.mark.parametrize("bad", [4096, 100, 0, -8192, 8192.0, 8192.5, True, "8192"])
def test_bad_target_length(bad) -> None:
    assert "target length" in _error(validate_request, analyze(LLAMA), "linear", None, bad)


def test_validate_returns_factor() -> None:
    info = analyze(LLAMA)
    assert validate_request(info, "yarn", 3, None) == 3.0
    assert isinstance(validate_request(info, "yarn", 3, None), float)
    assert validate_request(info, "yarn", None, 10240) == 2.5


@pytest.mark.parametrize(
    ("method", "options", "words"),
    [
        ("yarn", {"beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast"),
        ("yarn", {"beta_slow": 0.0}, "beta_slow"),
        ("yarn", {"attention_factor": -1.0}, "attention_factor"),
        ("yarn", {"attention_factor": math.nan}, "attention_factor"),
        ("llama3", {"low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
        ("linear", {"beta_fast": 16.0}, "applies only to method yarn"),
        ("ntk", {"attention_factor": 1.2}, "applies only to method yarn"),
        ("yarn", {"low_freq_factor": 2.0}, "applies only to method llama3"),
    ],
)
def test_bad_options(method: str, options: dict, words: str) -> None:
    assert words in _error(extend_config, LLAMA, method, 2.0, **options)


def test_non_dict_and_incomplete_configs() -> None:
    _error(analyze, ["not", "a", "dict"])
    _error(analyze, {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"})
    _error(analyze, {k: v for k, v in LLAMA.items() if k != "num_attention_heads"})
    _error(analyze, {**LLAMA, "max_position_embeddings": "4096"})


def test_odd_rotary_dim_refused() -> None:
    cfg = {**LLAMA, "partial_rotary_factor": 0.01}  # int(128 * 0.01) = 1
    assert "rotary dimension" in _error(extend_config, cfg, "yarn", 2.0)


# --------------------------------------------------------------------------- extend_config


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg", [LLAMA, QWEN2_V5, PYTHIA, GEMMA3, GEMMA3_LEGACY])
def test_input_never_mutated_and_output_independent(cfg: dict, method: str) -> None:
    before = copy.deepcopy(cfg)
    out = extend_config(cfg, method, 2.0)
    assert cfg == before
    json.dumps(out)

    def scribble(node):
        if isinstance(node, dict):
            for value in node.values():
                scribble(value)
            node["scribble"] = 1
        elif isinstance(node, list):
            node.append("scribble")

    scribble(out)
    assert cfg == before


EXPECTED_MAX = {"linear": 4096, "dynamic": 4096, "yarn": 12288, "ntk": 12288, "llama3": 12288}


@pytest.mark.parametrize("method", METHODS)
def test_max_position_embeddings_per_method(method: str) -> None:
    by_factor = extend_config(LLAMA, method, 3.0)
    by_target = extend_config(LLAMA, method, target_length=12288)
    assert by_factor["max_position_embeddings"] == EXPECTED_MAX[method]
    assert by_factor == by_target
    assert by_factor["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("method", ["linear", "dynamic", "yarn", "llama3"])
def test_legacy_mirror_matches_rope_parameters(method: str) -> None:
    out = extend_config(LLAMA, method, 2)
    params, mirror = out["rope_parameters"], out["rope_scaling"]
    assert mirror["type"] == mirror["rope_type"] == params["rope_type"] == method
    assert {k: v for k, v in mirror.items() if k != "type"} == params
    assert mirror["rope_theta"] == out["rope_theta"] == params["rope_theta"] == 10000.0
    for key in ("factor", "rope_theta", "low_freq_factor", "high_freq_factor", "beta_fast"):
        if key in params:
            assert type(params[key]) is float, key
    assert params["factor"] == 2.0


def test_linear_and_dynamic_keys() -> None:
    for method in ("linear", "dynamic"):
        params = extend_config(LLAMA, method, 2.0)["rope_parameters"]
        # transformers warns about any other key for these types
        assert params == {"rope_type": method, "rope_theta": 10000.0, "factor": 2.0}


def test_ntk_writes_default_type_with_larger_theta() -> None:
    out = extend_config(LLAMA, "ntk", 4.0)
    theta = 10000.0 * 4.0 ** (128 / 126)
    assert out["rope_parameters"] == {"rope_type": "default", "rope_theta": pytest.approx(theta)}
    assert out["rope_theta"] == out["rope_parameters"]["rope_theta"]
    assert out["rope_scaling"] is None  # explicit null kept null: no scaling to mirror
    assert "rope_scaling" not in extend_config(QWEN2_V5, "ntk", 4.0)  # absent stays absent


def test_ntk_on_partial_rotary_uses_rotary_dim() -> None:
    out = extend_config(PYTHIA, "ntk", 4.0)
    theta = 10000.0 * 4.0 ** (16 / 14)  # d = 64 x 0.25, not the head dim
    assert out["rope_parameters"]["rope_theta"] == pytest.approx(theta)
    assert out["rope_parameters"]["partial_rotary_factor"] == 0.25
    # GPTNeoXConfig reads rotary_emb_base / rotary_pct, not rope_theta
    assert out["rotary_emb_base"] == out["rope_theta"] == out["rope_parameters"]["rope_theta"]
    assert out["rotary_pct"] == 0.25


def test_yarn_keys_and_attention_factor() -> None:
    params = extend_config(LLAMA, "yarn", 4.0)["rope_parameters"]
    assert params == {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    custom = extend_config(LLAMA, "yarn", 4.0, beta_fast=16, beta_slow=2, attention_factor=1)
    params = custom["rope_parameters"]
    assert (params["beta_fast"], params["beta_slow"], params["attention_factor"]) == (
        16.0,
        2.0,
        1.0,
    )
    assert type(params["attention_factor"]) is float  # transformers warns on an int


def test_llama3_keys() -> None:
    out = extend_config(LLAMA, "llama3", 2.0, low_freq_factor=2, high_freq_factor=8)
    assert out["rope_parameters"] == {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 2.0,
        "low_freq_factor": 2.0,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 4096,
    }
    assert out["max_position_embeddings"] == 8192


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg", [GEMMA3, GEMMA3_LEGACY], ids=["v5", "legacy"])
def test_gemma3_scales_full_attention_only(cfg: dict, method: str) -> None:
    out = extend_config(cfg, method, 8.0)
    layers = out["rope_parameters"]
    assert layers["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    full = layers["full_attention"]
    assert full["rope_type"] == ("default" if method == "ntk" else method)
    if method == "ntk":
        assert full["rope_theta"] == pytest.approx(1e6 * 8.0 ** (256 / 254))
    else:
        assert full["rope_theta"] == 1e6 and full["factor"] == 8.0
        # transformers merges legacy rope_scaling into full_attention only
        assert out["rope_scaling"]["type"] == method
    assert out["rope_theta"] == full["rope_theta"]
    assert out["rope_local_base_freq"] == 10000.0
    # vLLM reads Gemma 3's max_position_embeddings as already scaled: only dynamic keeps 32768
    assert out["max_position_embeddings"] == (32768 if method == "dynamic" else 8 * 32768)
    assert out.get("layer_types") == cfg.get("layer_types")


def test_stale_top_level_theta_is_rewritten() -> None:
    cfg = {**QWEN2_V5, "rope_theta": 10000.0}  # rope_parameters says 1e6
    out = extend_config(cfg, "linear", 2.0)
    assert out["rope_theta"] == out["rope_scaling"]["rope_theta"] == 1e6


def test_non_integral_product_rounds_length() -> None:
    out = extend_config(LLAMA, "yarn", 1.3)
    assert out["max_position_embeddings"] == round(4096 * 1.3)
    tiny = extend_config({**LLAMA, "max_position_embeddings": 64}, "llama3", 1.001)
    assert tiny["max_position_embeddings"] == 65  # always longer than the trained length


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    factor=st.floats(1.01, 64.0, allow_nan=False),
    cfg=st.sampled_from([LLAMA, QWEN2_V5, PYTHIA, GEMMA3, GEMMA3_LEGACY]),
)
def test_extend_properties(method: str, factor: float, cfg: dict) -> None:
    before = copy.deepcopy(cfg)
    out = json.loads(json.dumps(extend_config(cfg, method, factor)))
    assert cfg == before
    info, new = analyze(cfg), analyze(out)
    assert new.trained_length == info.trained_length
    assert new.refusal is not None  # re-extending is refused
    keeps = ("dynamic",) if info.model_type.startswith("gemma3") else ("linear", "dynamic")
    expected_max = info.trained_length if method in keeps else None
    if expected_max is not None:
        assert out.get("text_config", out)["max_position_embeddings"] == expected_max
    else:
        assert out["max_position_embeddings"] == max(
            round(info.trained_length * factor), info.trained_length + 1
        )


# --------------------------------------------------------------------------- config_diff


def test_config_diff() -> None:
    before = {"a": 1, "nested": {"x": 1, "y": 2}, "gone": 3, "null": None}
    after = {"a": 1.0, "nested": {"x": 1, "y": 5, "z": 6}, "null": {"k": 1}, "new": [1]}
    assert config_diff(before, after) == [
        ("a", 1, 1.0),
        ("nested.y", 2, 5),
        ("nested.z", None, 6),
        ("gone", 3, None),
        ("null", None, {"k": 1}),
        ("new", None, [1]),
    ]
    assert config_diff(before, copy.deepcopy(before)) == []


def test_config_diff_of_extension() -> None:
    diff = dict(
        (path, (old, new))
        for path, old, new in config_diff(LLAMA, extend_config(LLAMA, "yarn", 2.0))
    )
    assert diff["max_position_embeddings"] == (4096, 8192)
    assert diff["rope_scaling"][0] is None and diff["rope_scaling"][1]["type"] == "yarn"
    assert diff["original_max_position_embeddings"] == (None, 4096)
    assert "rope_theta" not in diff  # unchanged


# --------------------------------------------------------------------------- inspect + references


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
        assert 0.0 <= row["methods"]["yarn"]["ramp"] <= 1.0
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
    llama3 = [r["methods"]["llama3"]["regime"] for r in rows]
    assert llama3[0] == "extrapolated" and llama3[-1] == "interpolated" and "blended" in llama3


def test_pair_table_refusals_and_subset() -> None:
    _error(pair_table, analyze({"model_type": "gpt2"}), 4096)
    _error(pair_table, analyze(LLAMA), 1024)
    _error(pair_table, analyze(LLAMA), 8192, methods=("nope",))
    rows = pair_table(analyze(PYTHIA), 8192, methods=("yarn",), factor=2.0)
    assert len(rows) == 8 and set(rows[0]["methods"]) == {"yarn"}
    assert rows[-1]["methods"]["yarn"]["stretch"] == pytest.approx(2.0)


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


def test_ropeinfo_is_frozen() -> None:
    info = analyze(LLAMA)
    assert isinstance(info, RopeInfo)
    with pytest.raises(AttributeError):
        info.rope_theta = 1.0  # type: ignore[misc]
