"""AdamW with weight decay on matrices only, and the learning-rate schedule.

Shared by `ctxext finetune` and the bundled model's pre-training (:mod:`ctxext.bundled_train`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ctxext.config import FinetuneConfig, LrSchedule


def adamw(
    params: Iterable[Any], *, lr: float, betas: tuple[float, float], weight_decay: float
) -> Any:  # -> torch.optim.AdamW
    """AdamW over ``params``; weight decay on matrices only (biases, norms and other vectors
    are not decayed, as in the usual LLM recipe)."""
    import torch

    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def make_optimizer(model: Any, cfg: FinetuneConfig) -> Any:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    return adamw(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def schedule_factor(step: int, *, warmup: int, steps: int, schedule: LrSchedule) -> float:
    """Multiplier of lr at optimizer step ``step`` (0-based): linear warm-up over ``warmup``
    steps, then constant, linear to 0, or cosine to 10% of lr at step ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    return schedule_factor(step, warmup=cfg.warmup(), steps=cfg.steps, schedule=cfg.lr_schedule)
