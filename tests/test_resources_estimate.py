"""The estimator (ctxext/resources/estimate.py, on shape.py, memory.py and timing.py): its counts
against transformers and peft, its memory model, its suggestions and byte sizes. The command and
the pre-run check are in test_cli_plan.py."""

from __future__ import annotations

import pytest
from conftest import BUNDLED

from ctxext.checkpoint import read_config
from ctxext.resources import estimate
from ctxext.resources.shape import ModelShape, Workload
from ctxext.resources.timing import Calibration

LLAMA2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0,
    "torch_dtype": "float16",
}  # fmt: skip
QWEN2_SMALL = {
    "model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000,
    "tie_word_embeddings": False,
}  # fmt: skip
MISTRAL_SMALL = {
    "model_type": "mistral", "hidden_size": 128, "intermediate_size": 352,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "vocab_size": 500, "tie_word_embeddings": True,
}  # fmt: skip
#: A fixed device so that the pure estimator's tests do not depend on this machine.
FIXED = Calibration(
    device="cpu:test",
    matmul_flops={64: 1e9, 4096: 1e11},
    attention_flops={512: 1e10, 4096: 3e10},
    bandwidth=1e10,
    runtime={"eval": 400 * 2**20, "finetune": 450 * 2**20, "lora": 480 * 2**20},
)


def _transformers_params(config: dict, lora_rank: int | None = None) -> tuple[int, int]:
    """(total, trainable) as transformers + peft count them, built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctxext.config import FinetuneConfig
    from ctxext.finetune.model import prepare_model
    from ctxext.modeling import build_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(build_config(config, False))
    if lora_rank is None:
        return sum(p.numel() for p in model.parameters()), 0
    _, trainable, total = prepare_model(model, FinetuneConfig(lora_rank=lora_rank))
    return total, trainable


@pytest.mark.parametrize(
    "config",
    [read_config(BUNDLED), QWEN2_SMALL, MISTRAL_SMALL, LLAMA2_7B],
    ids=["bundled-llama", "qwen2", "mistral", "llama2-7b"],
)
def test_parameter_counts_match_transformers_and_peft(config):
    shape = ModelShape.from_config(config)
    total, _ = _transformers_params(config)
    assert shape.total_params() == total
    work = Workload("finetune", 64, lora_rank=8)
    est = estimate.estimate(shape, work, FIXED)
    lora_total, lora_trainable = _transformers_params(config, lora_rank=8)
    assert est.params_total == lora_total
    assert est.params_trainable == lora_trainable


def test_llama2_7b_figures_follow_the_memory_model():
    shape = ModelShape.from_config(LLAMA2_7B)
    assert shape.total_params() == 6_738_415_616  # Llama-2-7B's published count
    full = estimate.estimate(shape, Workload("finetune", 32768), FIXED)
    assert full.weights == 4 * shape.total_params()
    assert full.optimizer == 8 * shape.total_params() and full.gradients == 4 * full.weights // 4
    # [32k, 32000] fp32 logits x3 (logits, log-softmax, its gradient) = 11.7 GiB.
    assert full.loss == 3 * 32768 * 32000 * 4
    ckpt = estimate.estimate(shape, Workload("finetune", 32768, grad_ckpt=True), FIXED)
    assert ckpt.activations < full.activations / 10
    assert ckpt.activations_other == full.activations
    lora = estimate.estimate(shape, Workload("finetune", 32768, lora_rank=16), FIXED)
    assert lora.optimizer < full.optimizer / 10
    # eval's chunked loss never holds more than the 256 MiB budget, whatever the length.
    ev = estimate.estimate(shape, Workload("eval", 32768), FIXED)
    assert ev.loss <= 256 * 2**20 and ev.gradients == ev.optimizer == 0


def test_task_episodes_add_their_mask_in_the_compute_dtype():
    shape = ModelShape.from_config(LLAMA2_7B)
    work = Workload("finetune", 32768, batch=2, compute_dtype="bfloat16")
    plain = estimate.estimate(shape, work, FIXED)
    packed = estimate.estimate(shape, Workload(**{**work.__dict__, "episodes": True}), FIXED)
    assert packed.attention - plain.attention == 2 * 32768 * 32768 * 2  # 4 GiB of bf16
    assert packed.peak - plain.peak == 4 * 2**30


def test_suggestions_fit_and_prefer_the_least_intrusive_change():
    shape = ModelShape.from_config(LLAMA2_7B)
    work = Workload("finetune", 32768, compute_dtype="bfloat16")
    full = estimate.estimate(shape, work, FIXED)
    limit = int(full.peak * 0.5)
    fixes = estimate.suggest_changes(shape, work, FIXED, limit, trained_length=4096)
    assert fixes, "some change must fit in half the memory"
    for fix in fixes:  # every suggestion, applied, fits
        changed = work
        if "--grad-ckpt" in fix:
            changed = Workload(**{**changed.__dict__, "grad_ckpt": True})
        if "--lora-rank" in fix:
            changed = Workload(**{**changed.__dict__, "lora_rank": 16})
        if "--pose" in fix:
            changed = Workload(**{**changed.__dict__, "length": 4096})
        if "--target-length" in fix:
            changed = Workload(**{**changed.__dict__, "length": int(fix.split()[-1])})
        assert estimate.estimate(shape, changed, FIXED).peak <= limit, fix


@pytest.mark.parametrize(
    "text,expected", [("512MB", 512e6), ("2GiB", 2 * 2**30), ("1e9", 1e9), ("80 GB", 80e9)]
)
def test_parse_bytes(text, expected):
    assert estimate.parse_bytes(text) == int(expected)
    with pytest.raises(ValueError):
        estimate.parse_bytes("lots")
