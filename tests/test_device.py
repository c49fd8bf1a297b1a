"""ctxext.device: the one place for the device choice and the ``--dtype auto`` rule."""

from __future__ import annotations

import torch

from ctxext.device import compute_dtype, describe_device, pick_device, resolve_dtype


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert compute_dtype("auto", "cuda") == "bfloat16"
    assert compute_dtype("auto", "cuda:0") == "bfloat16"
    assert compute_dtype("auto", "cuda:NVIDIA H100") == "bfloat16"  # a calibration's device
    assert compute_dtype("auto", "cpu") == "float32"  # bf16 is emulated (slow) on CPU
    for name in ("float32", "bfloat16", "float16"):
        assert compute_dtype(name, "cpu") == compute_dtype(name, "cuda") == name
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16


def test_the_device_is_the_one_torch_sees():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device() == expected
    assert describe_device().startswith(f"{expected}:")
