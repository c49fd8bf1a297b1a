"""The memory/time check below the CLI (ctxext/resources/guard.py): workloads built from typed configs,
and the verdict against a limit (the CLI's rendering of it is in test_cli_plan.py)."""

from __future__ import annotations

import pytest

from ctxext.config import EvalConfig, ExtendConfig, FinetuneConfig
from ctxext.errors import CtxextError
from ctxext.locate import resolve_model
from ctxext.resources import estimate, guard


def test_eval_run_has_one_phase_per_length_with_the_tokens_fed():
    cfg = EvalConfig(lengths=[256, 1024])
    run = guard.eval_workloads([resolve_model(None)], cfg, {256: 1000, 1024: 4000})
    assert (run.command, run.model, run.trained_length) == ("eval", "stdlib-llama", 256)
    assert [label for label, _ in run.phases] == ["eval 256 tokens", "eval 1,024 tokens"]
    assert [(w.length, w.tokens) for _, w in run.phases] == [(256, 1000), (1024, 4000)]


def test_finetune_run_trains_at_the_extended_length(tmp_path):
    cfg = FinetuneConfig(steps=3, lora_rank=4)
    run = guard.finetune_workloads(None, tmp_path / "o", ExtendConfig(method="yarn", factor=4), cfg)
    ((label, work),) = run.phases
    assert label == "finetune 1,024 tokens x 3 steps" and work.length == 1024
    assert work.lora_rank == 4 and work.steps == 3
    assert not (tmp_path / "o").exists()  # planning writes nothing


def test_verdict_refuses_with_the_phase_that_decides_the_peak(calibrated):
    run = guard.eval_workloads([resolve_model(None)], EvalConfig(lengths=[256, 2048]), None)
    tight = guard.assess(run, "1MB", measure=False)
    assert (tight.limit, tight.where) == (10**6, "--memory-limit")
    assert tight.peak == max(
        estimate.estimate(run.shape, w, tight.calib).peak for _, w in run.phases
    )
    message = tight.refusal()
    assert message.startswith(f"eval needs ~{estimate.format_bytes(tight.peak)} at its peak")
    assert "(eval 2,048 tokens)" in message and "977 KiB is available (--memory-limit)" in message
    roomy = guard.assess(run, "1TB", measure=False)
    assert roomy.refusal() is None and roomy.peak == tight.peak


def test_a_bad_memory_limit_is_one_clear_error():
    run = guard.eval_workloads([resolve_model(None)], EvalConfig(lengths=[256]), None)
    with pytest.raises(CtxextError, match="--memory-limit: "):
        guard.assess(run, "lots", measure=False)
