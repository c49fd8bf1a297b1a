"""ctxext.finetune.loop: real (tiny) training runs; gradient accumulation and 2-process data
parallelism see the same global batch as one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import finetune_cfg, max_weight_diff, model_weights, subprocess_env

from ctxext.config import ExtendConfig
from ctxext.finetune.loop import run_finetune

CLI_MODULE = "ctxext"
YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares CPU runs (bitwise / 2 gloo processes)"
)


def test_grad_accum_matches_a_bigger_batch(tmp_path, tiny_llama_session):
    a = run_finetune(str(tiny_llama_session), tmp_path / "a", YARN2, finetune_cfg(batch_size=2))
    b = run_finetune(
        str(tiny_llama_session), tmp_path / "b", YARN2, finetune_cfg(batch_size=1, grad_accum=2)
    )
    assert a["global_batch"] == b["global_batch"] == 2
    assert max_weight_diff(model_weights(tmp_path / "a"), model_weights(tmp_path / "b")) < 1e-5


@CPU_ONLY
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_llama_session):
    single = tmp_path / "one"
    run_finetune(str(tiny_llama_session), single, YARN2, finetune_cfg(steps=3, batch_size=2))
    multi = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "-m", CLI_MODULE, "finetune",
        str(tiny_llama_session), "-o", str(multi), "--method", "yarn", "--factor", "2",
        "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--save-every", "2",
        "--batch-size", "1", "--json",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])  # printed once (main process)
    assert summary["num_processes"] == 2 and summary["global_batch"] == 2
    assert max_weight_diff(model_weights(multi), model_weights(single)) < 1e-5
    log_one = [json.loads(x) for x in (single / "training_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (multi / "training_log.jsonl").read_text().splitlines()]
    for a, b in zip(log_one, log_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
