"""ctxext.finetune.model: what a fine-tune trains (all weights; LoRA adapters plus embeddings
and norms in fp32; adapters only), with a seeded LoRA initialisation."""

from __future__ import annotations

import torch
from conftest import finetune_cfg

from ctxext.finetune.model import prepare_model


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_full_finetune_trains_every_weight(tiny_llama_session):
    model, trainable, total = prepare_model(_load(tiny_llama_session), finetune_cfg())
    assert trainable == total == sum(p.numel() for p in model.parameters())
    assert model.training and model.config.use_cache is False


def test_lora_trains_adapters_embeddings_and_norms_in_fp32(tiny_llama_session):
    model, trainable, total = prepare_model(_load(tiny_llama_session), finetune_cfg(lora_rank=4))
    names = _trainable(model)
    assert trainable == sum(p.numel() for p in names.values()) < total
    assert all("lora_" in n or "embed_tokens" in n or "norm" in n for n in names), names
    assert any("embed_tokens" in n for n in names) and any("input_layernorm" in n for n in names)
    assert any("q_proj.lora_A" in n for n in names) and any("down_proj.lora_B" in n for n in names)
    # bf16 weights would lose the optimizer's small updates: what trains is fp32.
    assert {p.dtype for p in names.values()} == {torch.float32}
    frozen = [p for n, p in model.named_parameters() if n.endswith("q_proj.base_layer.weight")]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)


def test_lora_adapters_only_and_seeded_initialisation(tiny_llama_session):
    cfg = finetune_cfg(lora_rank=4, lora_trainable="none")
    a = _trainable(prepare_model(_load(tiny_llama_session), cfg)[0])
    assert a and all("lora_" in n for n in a)
    again = _trainable(prepare_model(_load(tiny_llama_session), cfg)[0])
    other = _trainable(
        prepare_model(_load(tiny_llama_session), cfg.model_copy(update={"seed": 1}))[0]
    )
    key = next(n for n in a if "lora_A" in n)
    assert torch.equal(a[key], again[key]) and not torch.equal(a[key], other[key])
