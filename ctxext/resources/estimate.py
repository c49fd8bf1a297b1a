"""Memory and time a run will need, from the model's config.json and the run's settings alone.

Pure: no torch, no weights, no files. :mod:`ctxext.resources.calibrate` measures this device once
(matmul and attention throughput, memory bandwidth, the resident size of the Python/torch
runtime) and this module turns a config + a workload into the figures `ctxext plan` prints.

The memory model is :mod:`ctxext.resources.memory`'s, the time model
:mod:`ctxext.resources.timing`'s, on the inputs of :mod:`ctxext.resources.shape`; this module
puts them together into the peak of a step and suggests changes that fit a limit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ctxext.resources import memory
from ctxext.resources.shape import ModelShape, Workload, trainable_params
from ctxext.resources.timing import Calibration, step_seconds


@dataclass(frozen=True)
class Estimate:
    """Peak memory by component (bytes) and time (seconds) of one workload."""

    params_total: int
    params_trainable: int
    runtime: int
    weights: int
    optimizer: int
    gradients: int
    activations: int
    activations_other: int
    """Activations with gradient checkpointing switched the other way (for comparison)."""
    attention: int
    loss: int
    peak: int
    seconds_per_step: float
    """One optimizer step (finetune) or one forward of ``length`` tokens (eval)."""
    seconds_per_token: float
    seconds: float | None
    """The whole run, when its size is known."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the estimate


def estimate(shape: ModelShape, work: Workload, calib: Calibration) -> Estimate:
    """Memory by component and time for ``work`` on ``shape`` on the calibrated device."""
    trainable = trainable_params(shape, work)
    weights = memory.weights_bytes(shape, work)
    act_on = memory.activation_bytes(shape, work, True)
    act_off = memory.activation_bytes(shape, work, False)
    activations = act_on if work.grad_ckpt else act_off
    attention = memory.attention_bytes(shape, work)
    loss = memory.loss_bytes(shape, work)
    gpu = work.device_map_auto and not calib.device.startswith("cpu")
    if work.kind == "eval":
        optimizer = gradients = 0
        transient = activations + attention + loss
        resident = 0 if gpu else weights  # spread over the devices: ~nothing stays here
    else:
        optimizer, gradients = memory.ADAM_BYTES * trainable, 4 * trainable
        transient = max(gradients, activations + attention + loss)
        resident = weights + optimizer
    runtime = _runtime(calib, work)
    per_step = step_seconds(shape, work, calib)
    tokens_per_step = work.length * work.batch * work.grad_accum
    total = None
    if work.kind == "finetune":
        total = per_step * work.steps
    elif work.tokens is not None:
        total = per_step * work.tokens / tokens_per_step
    return Estimate(
        params_total=shape.total_params()
        + (shape.lora_params(work.lora_rank) if work.lora_rank else 0),
        params_trainable=trainable,
        runtime=runtime,
        weights=weights,
        optimizer=optimizer,
        gradients=gradients,
        activations=activations,
        activations_other=act_off if work.grad_ckpt else act_on,
        attention=attention,
        loss=loss,
        peak=runtime + resident + transient,
        seconds_per_step=per_step,
        seconds_per_token=per_step / tokens_per_step,
        seconds=total,
    )


def _runtime(calib: Calibration, work: Workload) -> int:
    key = "eval" if work.kind == "eval" else "lora" if work.lora_rank else "finetune"
    return int(calib.runtime.get(key, 0))


# --------------------------------------------------------------------------- suggestions


def suggest_changes(
    shape: ModelShape, work: Workload, calib: Calibration, limit: int, trained_length: int
) -> list[str]:
    """The cheapest changes (fewest, least intrusive first) whose estimate fits in ``limit``.

    Order of preference: gradient checkpointing (same result, ~1/3 slower), LoRA (fewer
    trainable weights), a PoSE window of the trained length (same target, shorter sequences),
    --device-map auto (eval on a GPU), and last a shorter length (a different run).
    """
    options: list[tuple[str, Workload]] = []
    if work.kind == "finetune":
        if not work.grad_ckpt:
            options.append(("--grad-ckpt", replace(work, grad_ckpt=True)))
        if work.lora_rank is None:
            options.append(("--lora-rank 16", replace(work, lora_rank=16)))
        if work.length > trained_length:
            window = replace(work, length=trained_length)
            options.append((f"--pose --train-length {trained_length}", window))
    elif not work.device_map_auto and not calib.device.startswith("cpu"):
        options.append(("--device-map auto", replace(work, device_map_auto=True)))

    def fits(w: Workload) -> bool:
        return estimate(shape, w, calib).peak <= limit

    found = [name for name, w in options if fits(w)]
    if not found:  # two changes together
        for i, (a, wa) in enumerate(options):
            for b, wb in options[i + 1 :]:
                if fits(_combine(work, wa, wb)):
                    found.append(f"{a} {b}")
    if not found and len(options) == 3 and fits(_combine(work, *(w for _, w in options))):
        found.append(" ".join(name for name, _ in options))
    shorter = _longest_fitting(work, fits)
    if shorter is not None:
        flag = "--lengths" if work.kind == "eval" else "--target-length"
        found.append(f"{flag} {shorter}")
    return found[:3]


def _combine(base: Workload, *changed: Workload) -> Workload:
    """``base`` with every field that any of ``changed`` sets differently."""
    out = base
    for w in changed:
        diff = {k: v for k, v in asdict(w).items() if asdict(base)[k] != v}
        out = replace(out, **diff)
    return out


def _longest_fitting(work: Workload, fits: Any) -> int | None:
    """The longest power-of-two-halved length (>= 256) that fits, if any shorter one does."""
    length = work.length // 2
    while length >= 256:
        if fits(replace(work, length=length)):
            return length
        length //= 2
    return None


# --------------------------------------------------------------------------- units


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_UNITS |= {"t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'512MB', '2GiB', '1e9', '80 GB' -> bytes; ValueError on anything else."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512MB, 2GiB, 80GB)")
    value = float(num) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512MB, 2GiB, 80GB)")
    return int(value)
