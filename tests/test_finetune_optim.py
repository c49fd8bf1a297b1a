"""ctxext.finetune.optim: AdamW decays matrices only; the warm-up and lr schedules; the
bundled model's pre-training schedule (which now calls schedule_factor) is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import finetune_cfg

from ctxext.finetune.optim import adamw, lr_factor, make_optimizer, schedule_factor


def _zero_grad_step(params: list[torch.Tensor], opt: torch.optim.Optimizer) -> None:
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()


def test_adamw_decays_matrices_and_leaves_vectors_alone():
    torch.manual_seed(0)
    layer, norm = torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)
    params = [*layer.parameters(), *norm.parameters()]  # weight [3, 4], bias, norm w/b [3]
    before = [p.detach().clone() for p in params]
    opt = adamw(params, lr=0.1, betas=(0.9, 0.95), weight_decay=0.5)
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(1, 0.5), (3, 0.0)]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8
    # A zero gradient makes Adam's update 0: only decoupled weight decay moves a parameter,
    # p <- p (1 - lr wd), and only the matrix.
    _zero_grad_step(params, opt)
    assert torch.allclose(layer.weight, before[0] * (1 - 0.1 * 0.5))
    for p, b in zip(params[1:], before[1:], strict=True):
        assert torch.equal(p, b)


def test_make_optimizer_takes_the_trainable_parameters_and_drops_empty_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[0].requires_grad_(False)  # e.g. a frozen LoRA base
    opt = make_optimizer(model, finetune_cfg(weight_decay=0.1, lr=3e-4, adam_beta2=0.99))
    assert len(opt.param_groups) == 1  # no matrix is trainable: no empty decay group
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.0 and group["lr"] == 3e-4 and group["betas"] == (0.9, 0.99)
    assert {id(p) for p in group["params"]} == {id(p) for p in model[1].parameters()}


def test_schedules_warm_up_then_hold_decay_linearly_or_follow_a_cosine():
    steps, warmup = 20, 4
    for kind in ("constant", "linear", "cosine"):
        f = [
            schedule_factor(s, warmup=warmup, steps=steps, schedule=kind) for s in range(steps + 1)
        ]
        assert f[:warmup] == [0.25, 0.5, 0.75, 1.0]  # linear warm-up reaches lr at its end
        assert f[warmup] == 1.0
        assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :], strict=False))
    assert schedule_factor(steps, warmup=warmup, steps=steps, schedule="constant") == 1.0
    assert schedule_factor(steps, warmup=warmup, steps=steps, schedule="linear") == 0.0
    mid = warmup + (steps - warmup) // 2
    assert schedule_factor(mid, warmup=warmup, steps=steps, schedule="cosine") == pytest.approx(
        0.55
    )
    for s in (steps, steps + 5):  # cosine ends at 10% of lr and stays there
        assert schedule_factor(s, warmup=warmup, steps=steps, schedule="cosine") == pytest.approx(
            0.1
        )
    cfg = finetune_cfg(steps=20, warmup_steps=0.2, lr_schedule="linear")
    assert [lr_factor(s, cfg) for s in range(21)] == [
        schedule_factor(s, warmup=4, steps=20, schedule="linear") for s in range(21)
    ]


@pytest.mark.parametrize("steps", [1, 60, 1500])
def test_bundled_pretraining_schedule_is_bit_for_bit_what_it_was(steps):
    """ctxext.bundled_train used its own closure before it shared schedule_factor; the bundled
    model is reproducible only if every lr multiplier is the same float."""
    warmup = max(1, steps // 50)

    def before(step: int) -> float:  # the closure bundled_train had, verbatim
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    for step in range(steps + 1):  # LambdaLR asks for steps 0 .. steps
        assert schedule_factor(step, warmup=warmup, steps=steps, schedule="cosine") == before(step)
