"""Phi-3 / PhiMoE (transformers reads only longrope for them): every factor method written as
per-pair longrope factors (ctxext/rope/longrope.py), proven equal to the direct method."""

from __future__ import annotations

import itertools
import math

import pytest
from rope_configs import one_line_error

from ctxext.rope import analyze, extend_config
from ctxext.rope.longrope import method_as_longrope

SHAPE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "vocab_size": 32,
    "pad_token_id": 0,
}
OPTIONS = {  # non-default options too: they must carry over
    "linear": {},
    "ntk": {},
    "yarn": {"beta_fast": 16.0, "attention_factor": 1.2},
    "llama3": {"high_freq_factor": 8.0},
}


def _rotary(model_type: str, config: dict, seq_len: int):
    """transformers' own inv_freq and attention scaling for ``config`` at ``seq_len``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    cfg = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        rotary = type(AutoModelForCausalLM.from_config(cfg).model.rotary_emb)
    module = rotary(config=cfg)
    ids = torch.arange(seq_len)[None]
    # longrope picks its long or short factors by the sequence length here
    cos, sin = module(torch.zeros(1, seq_len, 4), ids)
    return module.inv_freq.double(), cos[0], sin[0]


def _assert_same_rotary(family: str, config: dict, llama: dict, seq_len: int, scale=1.0):
    """transformers' inv_freq, cos and sin for ``config`` (a ``family`` model) at ``seq_len``
    are those of the Llama config ``llama``, cos and sin times ``scale``."""
    import torch

    want, want_cos, want_sin = _rotary("llama", llama, seq_len)
    got, got_cos, got_sin = _rotary(family, config, seq_len)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # cos at position 0 is the attention scaling; the angles agree at every position
    torch.testing.assert_close(got_cos, scale * want_cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sin, scale * want_sin, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("family", ["phi3", "phimoe"])
def test_each_method_as_longrope_equals_the_direct_method_on_a_llama(method, family):

    direct = extend_config({"model_type": "llama", **SHAPE}, method, 4.0, **OPTIONS[method])
    extra = {"num_local_experts": 2, "num_experts_per_tok": 1} if family == "phimoe" else {}
    written = extend_config(
        {"model_type": family, **SHAPE, **extra}, method, 4.0, **OPTIONS[method]
    )
    entry = written["rope_parameters"]
    assert entry["rope_type"] == "longrope" and written["rope_scaling"]["type"] == "longrope"
    for seq_len in (32, 256):  # below and past the trained length: short and long factors
        _assert_same_rotary(family, written, direct, seq_len)


def test_factors_match_the_formulas_typed_out_here():
    d, s, theta, length = 16, 4.0, 10000.0, 64
    common = {"factor": s, "base_theta": theta, "rotary_dim": d, "trained_length": length}
    linear = method_as_longrope({"rope_type": "linear", "factor": s}, **common)
    assert linear["long_factor"] == [s] * (d // 2) == linear["short_factor"]
    assert linear["attention_factor"] == 1.0
    k = 7.5  # static NTK: theta' = k theta, so lambda_j = k ** (2j / d)
    ntk = method_as_longrope({"rope_type": "default", "rope_theta": k * theta}, **common)
    assert ntk["long_factor"] == pytest.approx([k ** (2 * j / d) for j in range(d // 2)])
    yarn = method_as_longrope({"rope_type": "yarn", "factor": s}, **common)
    assert yarn["attention_factor"] == pytest.approx(0.1 * math.log(s) + 1)
    lam = yarn["long_factor"]  # by parts: fast pairs kept (1), slow pairs divided by s
    assert lam[0] == pytest.approx(1.0) and lam[-1] == pytest.approx(s)
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(lam))
    given = {"rope_type": "longrope", "long_factor": [2.0] * 8, "short_factor": [1.0] * 8}
    assert method_as_longrope(given, **common) == given


def test_phi3_takes_every_method_but_dynamic_and_tunes_longrope():
    cfg = {"model_type": "phi3", **SHAPE}
    info = analyze(cfg)
    assert info.refusal is None and "dynamic" not in info.allowed_methods
    message = one_line_error(extend_config, cfg, "dynamic", 2.0)
    assert "longrope" in message and "dynamic" in message
    tuned = extend_config(cfg, "longrope", 2.0, long_factor=[1.5] * 8)
    assert tuned["rope_parameters"]["long_factor"] == [1.5] * 8


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_keep_short_runs_the_trained_rope_up_to_the_trained_length_and_the_method_past_it(
    method, family
):
    """--keep-short: what transformers computes from the written config is the unscaled
    model's rotary embedding (times the method's attention factor) for sequences up to the
    trained length 64, and the direct method's past it."""

    base = {"model_type": family, **SHAPE}
    direct = extend_config({"model_type": "llama", **SHAPE}, method, 4.0, **OPTIONS[method])
    written = extend_config(base, method, 4.0, keep_short=True, **OPTIONS[method])
    entry = written["rope_parameters"]
    assert entry["rope_type"] == "longrope" and set(entry["short_factor"]) == {1.0}
    assert written["max_position_embeddings"] == 256
    scale = OPTIONS[method].get("attention_factor", 1.0)
    for seq_len in (20, 64):  # up to the trained length: the trained frequencies
        _assert_same_rotary(family, written, {"model_type": "llama", **SHAPE}, seq_len, scale)
    for seq_len in (65, 256):  # past it: the method's own
        _assert_same_rotary(family, written, direct, seq_len)


def test_keep_short_is_refused_where_the_method_sets_its_short_mode_itself():
    cfg = {"model_type": "llama", **SHAPE}
    for method, kw in (("dynamic", {}), ("longrope", {"long_factor": [2.0] * 8})):
        message = one_line_error(extend_config, cfg, method, 2.0, keep_short=True, **kw)
        assert "keep_short" in message and method in message
    from pydantic import ValidationError

    from ctxext.config import ExtendConfig

    with pytest.raises(ValidationError, match="keep_short"):
        ExtendConfig(method="dynamic", factor=2, keep_short=True)
    # Recorded only when set: specs written before it existed serialise as they did.
    assert "keep_short" not in ExtendConfig(method="yarn", factor=2).model_dump()
    assert ExtendConfig(method="yarn", factor=2, keep_short=True).model_dump()["keep_short"]


@pytest.mark.parametrize(
    "family",
    ["mistral", "qwen3_moe", "gemma2", "gemma3_text", "gpt_neox", "phi", "falcon", "olmo2"],
)
def test_keep_short_switches_in_every_listed_family(family):
    """The whole config a family's class writes (its own head_dim, partial rotary, layer types):
    transformers' rotary module computes the trained frequencies up to the trained length and
    YaRN's past it (Gemma 3: the full-attention layers; sliding ones stay unscaled)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**SHAPE, "num_hidden_layers": 6, "max_position_embeddings": 64}
    if family == "falcon":
        shape.update(new_decoder_architecture=True, alibi=False)
    base = {**AutoConfig.for_model(family, **shape).to_dict(), "model_type": family}
    kept = extend_config(base, "yarn", 4.0, keep_short=True)
    yarn = extend_config(base, "yarn", 4.0)

    def inv_freq(config: dict, seq_len: int, layer_type: str | None) -> torch.Tensor:
        data = dict(config)
        cfg = AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        rotary = next(m for m in model.modules() if "Rotary" in type(m).__name__)
        module = type(rotary)(config=cfg)
        extra = {"layer_type": layer_type} if layer_type else {}
        module(torch.zeros(1, seq_len, 4), torch.arange(seq_len)[None], **extra)
        return getattr(module, f"{layer_type}_inv_freq" if layer_type else "inv_freq").clone()

    layers = ("full_attention", "sliding_attention") if family == "gemma3_text" else (None,)
    for layer in layers:
        torch.testing.assert_close(inv_freq(kept, 64, layer), inv_freq(base, 64, layer))
        torch.testing.assert_close(inv_freq(kept, 200, layer), inv_freq(yarn, 200, layer))
    if family == "gemma3_text":  # the full-attention layers do switch
        assert not torch.allclose(inv_freq(kept, 200, layers[0]), inv_freq(base, 200, layers[0]))
