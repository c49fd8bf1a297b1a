"""Where ctxext computes and in which dtype: the one place for the device choice and for the
``--dtype auto`` rule (bf16 on CUDA, fp32 elsewhere: bf16 is emulated, hence slow, on CPU)."""

from __future__ import annotations

import platform
from typing import Any


def pick_device() -> str:
    """``cuda`` when a CUDA device is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_device() -> str:
    """The chosen device and its model, e.g. ``cuda:NVIDIA H100`` or ``cpu:x86_64``."""
    if pick_device() == "cuda":
        import torch

        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def compute_dtype(dtype: str, device: str) -> str:
    """The dtype name ``--dtype`` means on ``device``: ``auto`` is bfloat16 on CUDA and
    float32 elsewhere; float32, bfloat16 and float16 mean themselves."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def resolve_dtype(dtype: str, device: str) -> Any:  # -> torch.dtype
    """:func:`compute_dtype` as a torch dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        compute_dtype(dtype, device)
    ]
