"""ctxext.rope.write: checking a request and writing the extended config, method by method."""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rope_configs import GEMMA3, GEMMA3_LEGACY, LLAMA, PHI_V5, PYTHIA, QWEN2_V5
from rope_configs import one_line_error as _error

from ctxext.rope.methods import ALL_METHODS, METHODS
from ctxext.rope.read import analyze
from ctxext.rope.write import config_diff, extend_config, validate_request


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


# The keys transformers 4.57 accepts in rope_scaling per type (modeling_rope_utils._validate_*);
# any other key logs "Unrecognized keys in `rope_scaling`" on every load. "type" counts as rope_type.
V4_ROPE_SCALING_KEYS = {
    "linear": {"rope_type", "factor"},
    "dynamic": {"rope_type", "factor", "original_max_position_embeddings"},
    "yarn": {"rope_type", "factor", "attention_factor", "beta_fast", "beta_slow"}
    | {"original_max_position_embeddings", "mscale", "mscale_all_dim", "truncate"},
    "llama3": {"rope_type", "factor", "original_max_position_embeddings"}
    | {"low_freq_factor", "high_freq_factor"},
    "longrope": {"rope_type", "short_factor", "long_factor", "attention_factor", "factor"}
    | {"original_max_position_embeddings"},
}


def _extend_any(cfg: dict, method: str, factor: float) -> dict:
    """extend_config for every method; longrope gets PI's factors (one per rotary pair)."""
    if method != "longrope":
        return extend_config(cfg, method, factor)
    pairs = analyze(cfg).rotary_dim // 2
    return extend_config(cfg, method, factor, long_factor=[factor] * pairs)


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m != "ntk"])
@pytest.mark.parametrize("cfg", [LLAMA, PHI_V5, PYTHIA], ids=["llama", "phi-v5", "pythia"])
def test_legacy_mirror_holds_scaling_keys_only(cfg: dict, method: str) -> None:
    out = _extend_any(cfg, method, 2)
    params, mirror = out["rope_parameters"], out["rope_scaling"]
    assert mirror["type"] == mirror["rope_type"] == params["rope_type"] == method
    assert set(mirror) - {"type"} <= V4_ROPE_SCALING_KEYS[method]
    # transformers 5 lets the mirror replace rope_parameters and fills in theta and the rotary
    # share from the top level: together they must give back the whole entry
    if cfg is PYTHIA:
        top = {"rope_theta": out["rotary_emb_base"], "partial_rotary_factor": out["rotary_pct"]}
    else:
        top = {k: out[k] for k in ("rope_theta", "partial_rotary_factor") if k in out}
    assert {**{k: v for k, v in mirror.items() if k != "type"}, **top} == params
    assert out["rope_theta"] == params["rope_theta"]
    for key in ("factor", "rope_theta", "low_freq_factor", "high_freq_factor", "beta_fast"):
        if key in params:
            assert type(params[key]) is float, key
    assert params["factor"] == 2.0


def test_partial_rotary_factor_written_at_the_top_level() -> None:
    out = extend_config(PHI_V5, "yarn", 2.0)
    assert out["partial_rotary_factor"] == out["rope_parameters"]["partial_rotary_factor"] == 0.4
    assert "partial_rotary_factor" not in extend_config(LLAMA, "yarn", 2.0)  # 1.0: nothing to add


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
    assert out["rope_theta"] == out["rope_parameters"]["rope_theta"] == 1e6
    assert "rope_theta" not in out["rope_scaling"]  # the top-level copy is the one readers use


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
