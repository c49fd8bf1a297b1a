"""Config dicts of real model families (and a one-line-error helper) shared by the rope tests."""

from __future__ import annotations

import pytest

from ctxext.errors import CtxextError

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

PHI_V5 = {  # as transformers 5 saves phi-2: partial_rotary_factor only inside rope_parameters
    "model_type": "phi",
    "hidden_size": 2560,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.4,
    },
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


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(CtxextError) as caught:
        fn(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message
