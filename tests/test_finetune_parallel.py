"""ctxext.finetune.parallel: compute dtypes, context parallelism refused off CUDA in one line,
and a single process reads its batches unchanged."""

from __future__ import annotations

import contextlib

import pytest
import torch

from ctxext.errors import CtxextError
from ctxext.finetune.parallel import (
    check_context_parallel_device,
    check_parallelism,
    data_parallel_size,
    fsdp_mode,
    mixed_precision,
    model_inputs,
)


def test_mixed_precision_keeps_fp32_weights_and_autocasts():
    assert mixed_precision("auto", "cpu") == "no"  # bf16 is emulated (slow) on CPU
    assert mixed_precision("auto", "cuda:0") == "bf16"
    assert mixed_precision("float32", "cuda") == "no"
    assert mixed_precision("bfloat16", "cpu") == "bf16"
    assert mixed_precision("float16", "cuda") == "fp16"


def test_context_parallelism_is_refused_off_cuda(monkeypatch):
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(CtxextError, match=r"needs CUDA GPUs .* runs on cpu"):
        check_context_parallel_device("cpu")
    check_context_parallel_device("cuda:0")
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")
    check_context_parallel_device("cpu")


def test_one_process_reads_its_batches_unchanged():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert data_parallel_size(acc) == 1 and fsdp_mode(acc) is None
    check_parallelism(acc, 7)  # without context parallelism any length divides
    batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None]}
    inputs, context = model_inputs(acc, batch)
    assert inputs is batch and isinstance(context, contextlib.nullcontext)
