"""A loaded model given another method's rope in place (`ctxext.modeling.rescale`, what `eval`
does for the next method of the same model) equals a fresh load of that method, on the
bundled model, for every method, whatever ran before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxext.config import ExtendConfig
from ctxext.evaluate.loss import reset_rotary_state, token_nll
from ctxext.modeling import load_causal_lm, rescale, swap_rope
from ctxext.rope.methods import METHODS

LONGROPE = ExtendConfig(
    method="longrope", factor=4.0, long_factor=np.linspace(1.0, 5.0, 32).tolist()
)
DYNAMIC = ExtendConfig(method="dynamic", factor=4.0)
#: Every method, then back to the unscaled config, and dynamic again (its state rebuilt).
CHAIN = [*(ExtendConfig(method=m, factor=4.0) for m in METHODS), LONGROPE, None, DYNAMIC]


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 4096, (1, 1024), generator=g)
    seq[0, 0] = 0  # BOS
    return seq


def _nll(model, ids, length):
    reset_rotary_state(model)
    token_nll(model, ids)  # a longer input first: a length-dependent rope must be reset
    reset_rotary_state(model)
    return token_nll(model, ids[:, :length]).double()


def test_every_method_in_place_equals_a_fresh_load(ids):
    loaded = load_causal_lm(None, dtype="float32")
    weights = loaded.model.model.embed_tokens.weight
    for extend in CHAIN:
        loaded = rescale(loaded, extend)
        assert loaded is not None  # the bundled Llama's rope is swapped, never reloaded
        fresh = load_causal_lm(None, extend=extend, dtype="float32")
        assert loaded.label == fresh.label and loaded.config == fresh.config
        assert loaded.model.config.to_dict() == fresh.model.config.to_dict()
        assert loaded.model.model.embed_tokens.weight is weights  # the same weights
        for length in (1024, 300):
            diff = (_nll(loaded.model, ids, length) - _nll(fresh.model, ids, length)).abs()
            assert diff.max().item() < 1e-6, (loaded.label, length, diff.max().item())


def test_the_rope_really_changes(ids):
    """The comparison above can fail: the methods differ from each other at 1024 tokens."""
    loaded = load_causal_lm(None, dtype="float32")
    base = _nll(loaded.model, ids, 1024)
    yarn = rescale(loaded, ExtendConfig(method="yarn", factor=4.0))
    assert (_nll(yarn.model, ids, 1024) - base).abs().max().item() > 1e-2


def test_a_model_whose_other_modules_read_the_rope_is_not_swapped():
    """DeepSeek-V3's attention scales its softmax by YaRN's mscale when it is built: swapping
    the rotary module alone would not equal a fresh load, so the swap refuses (eval reloads)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16)
    heads = dict(num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16)
    dims = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_hidden_layers=1)
    config = DeepseekV3Config(max_position_embeddings=128, **sizes, **heads, **dims)
    model = DeepseekV3ForCausalLM(config).eval()
    current = config.to_dict()
    yarn = dict(
        current,
        rope_parameters={
            **current["rope_parameters"],
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )  # fmt: skip (DeepSeek-V3's values)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not swap_rope(model, current, yarn)
    assert model.config.rope_parameters == config.rope_parameters
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
