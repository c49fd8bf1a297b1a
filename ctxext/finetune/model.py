"""The model made trainable: all weights, or LoRA adapters (+ embeddings and norms)."""

from __future__ import annotations

import warnings
from typing import Any

from ctxext.config import FinetuneConfig


def _is_norm(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith(("Norm", "RMSNorm", "LayerNorm")) or "Norm" in name


def prepare_model(lm: Any, cfg: FinetuneConfig) -> tuple[Any, int, int]:
    """Make ``lm`` trainable as asked: all weights, or LoRA (+ embeddings/norms).

    Returns (model, trainable parameters, all parameters). LoRA targets every linear
    projection ("all-linear" leaves out the output head; fused ones such as GPT-NeoX's and
    Falcon's ``query_key_value`` are linear layers too) and, in mixture-of-experts models, the
    experts' stacked weight tensors (:func:`expert_parameters`); embeddings and norms are trained
    in place (requires_grad), so merge_and_unload keeps them and no module copies are made.
    """
    import torch

    lm.config.use_cache = False
    if cfg.grad_ckpt:
        _enable_checkpointing(lm)
    model = lm
    if cfg.lora_rank is not None:
        from peft import get_peft_model

        torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: make them reproducible
        lora = lora_config(cfg, lm)
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(lm, lora)
        extra = []
        if "embed" in cfg.lora_trainable:
            extra += list(lm.get_input_embeddings().parameters())
        if "norm" in cfg.lora_trainable:
            extra += [p for m in lm.modules() if _is_norm(m) for p in m.parameters()]
        for p in extra:
            p.requires_grad_(True)
            if p.dtype != torch.float32:  # optimizer updates are lost in bf16 weights
                p.data = p.data.float()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, trainable, total


def expert_parameters(lm: Any) -> list[str]:
    """The MoE experts' weights, which transformers 5 keeps as stacked 3-D parameters (one
    slice per expert, e.g. Mixtral's ``mlp.experts.gate_up_proj``) rather than linear layers,
    as the names peft's ``target_parameters`` matches (suffixes below the layer index)."""
    names = set()
    for name, p in lm.named_parameters():
        parts = name.split(".")
        if p.dim() == 3 and "experts" in parts:
            names.add(".".join(parts[parts.index("experts") :]))
    return sorted(names)


def routers(lm: Any) -> list[str]:
    """The MoE routers (and shared-expert gates) of ``lm``: linear layers LoRA leaves frozen,
    so that adapters do not re-route tokens (and PhiMoE's router, a linear layer returning a
    tuple, stays unwrapped)."""
    if not expert_parameters(lm):
        return []
    names = ("gate", "router", "shared_expert_gate")
    return sorted(
        name
        for name, module in lm.named_modules()
        if name.rpartition(".")[2] in names or "Router" in type(module).__name__
    )


def lora_config(cfg: FinetuneConfig, lm: Any) -> Any:
    """LoRA on every linear projection of ``lm`` but its routers, and on its experts' weights."""
    from peft import LoraConfig

    experts = expert_parameters(lm)
    return LoraConfig(
        target_parameters=experts or None,
        exclude_modules=routers(lm) or None,
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _enable_checkpointing(lm: Any) -> None:
    """Non-reentrant activation checkpointing (works with frozen LoRA bases and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
