"""Measure this device once (a few seconds) for :mod:`~ctxext.resources.estimate`; cache the result per machine.

What is measured, on the device ctxext would run on (CUDA if present, else CPU), in the dtype a
run computes in there (bf16 on CUDA, fp32 on CPU):

* matmul throughput of [M, k] @ [k, k] for k = 64 .. 4096 (each timed for ~0.15 s);
* causal SDPA forward throughput at 1024 tokens, 64-dim heads;
* memory bandwidth of an elementwise update of 64 MiB tensors (AdamW's step is bound by it);
* the resident size of the runtime, in a fresh subprocess: Python + torch + transformers + the
  ctxext modules a command imports, after running a tiny model once the way eval, a full
  fine-tune and a LoRA fine-tune do (thread pools, kernels, allocator arenas all exist by then).

The cache lives in ``$CTXEXT_CACHE_DIR`` (else the user cache dir, ``~/.cache/ctxext``), keyed by
host name, device, torch version and thread count: another machine or another torch measures
again. It records the load average the speeds were measured under: a fine-tune compares its
first steps with the prediction and measures again when they are off by more than 2x
(:class:`ctxext.resources.guard.StepCheck`); ``--recalibrate`` measures again at once. Available memory: ``$CTXEXT_MEMORY_LIMIT`` (e.g. ``2GB``) overrides what is measured.

Under a launcher (torchrun, ``accelerate launch``) only rank 0 measures (see
:func:`ctxext.resources.guard.assess`), and the runtime probe's subprocess runs as a plain process: it
inherits none of the launcher's variables, which would make it join the run's process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ctxext.device import describe_device, resolve_dtype
from ctxext.errors import CtxextError
from ctxext.resources.estimate import parse_bytes
from ctxext.resources.threads import machine_load
from ctxext.resources.timing import Calibration

__all__ = [
    "PESSIMISTIC",
    "available_memory",
    "cache_dir",
    "cached_calibration",
    "launched_rank",
    "load_calibration",
    "measure_runtime",
    "measure_speed",
    "save_calibration",
]

MEMORY_LIMIT_ENV = "CTXEXT_MEMORY_LIMIT"
CACHE_ENV = "CTXEXT_CACHE_DIR"
#: 4: the load average and thread count are recorded (older caches may hold a measurement taken
#: under load: they are measured again).
_VERSION = 4
_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
_ATTENTION_LENGTHS = (512, 1024, 2048, 4096)
#: A deliberately slow, memory-hungry stand-in used before this machine is measured: a run
#: that fits and is short even by it needs no calibration (see guard._calibration).
PESSIMISTIC = Calibration(
    device="cpu (not measured yet)",
    matmul_flops={64: 2e8, 4096: 5e9},
    attention_flops={512: 5e8, 4096: 2e9},
    bandwidth=1e9,
    runtime=dict.fromkeys(("eval", "finetune", "lora"), 2**30),
    op_seconds=1e-3,
)
#: What torchrun and `accelerate launch` export to each worker: the process group's rendezvous
#: (a subprocess inheriting it joins the run's group as a second rank and waits for it until
#: killed) and the launcher's options (FSDP, mixed precision, ...), which are the run's, not the
#: probe's.
_LAUNCHER_VARS = frozenset(
    ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
     "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
)  # fmt: skip
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")
#: CUDA context + caching allocator reserve, not measurable without a GPU here: 0.5 GiB.
_CUDA_RUNTIME = 512 * 2**20
#: Seconds the runtime probe may take: ~30 s (13 s of CPU) on an idle 2-core machine, 350 s on
#: one shared by a dozen busy processes.
_PROBE_TIMEOUT = 900


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ctxext"


def _cache_file(device: str) -> Path:
    import torch

    key = f"{_VERSION}|{platform.node()}|{device}|{torch.__version__}|{torch.get_num_threads()}"
    return cache_dir() / f"calibration-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def cached_calibration() -> Calibration | None:
    """This machine's calibration if it was measured before, else None."""
    path = _cache_file(describe_device())
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in ("matmul_flops", "attention_flops"):
            data[key] = {int(k): v for k, v in data[key].items()}
        return Calibration(**data)
    except (ValueError, KeyError, TypeError):
        return None  # an older or damaged cache: measure again


def load_calibration(refresh: bool = False) -> Calibration:
    """The cached calibration of this machine, measured now if missing (or ``refresh``)."""
    cached = None if refresh else cached_calibration()
    if cached is not None:
        return cached
    calib = _measure(describe_device())
    save_calibration(calib)
    return calib


def save_calibration(calib: Calibration) -> None:
    """Write ``calib`` as this machine's cached calibration (atomically)."""
    path = _cache_file(describe_device())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(calib.__dict__, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _measure(device: str) -> Calibration:
    cuda = device.startswith("cuda")
    runtime = dict.fromkeys(("eval", "finetune", "lora"), _CUDA_RUNTIME)
    if not cuda:
        runtime = measure_runtime()
    return measure_speed(Calibration(device, {}, {}, 0.0, runtime))


def measure_speed(base: Calibration) -> Calibration:
    """``base`` with its throughputs measured now (a few seconds; the runtime is kept).

    The op latency is measured first and taken out of every timed call, so that the
    throughputs are the arithmetic's and the latency is counted once, per kernel, by the plan.
    """
    import torch

    cuda = base.device.startswith("cuda")
    dev = "cuda" if cuda else "cpu"
    dtype = resolve_dtype("auto", base.device)
    load = machine_load()
    latency = _op_latency(dev)
    return Calibration(
        device=base.device,
        matmul_flops={k: _matmul_rate(k, dev, dtype, latency) for k in _SIZES},
        attention_flops=_attention_rates(dev, dtype, latency),
        bandwidth=_bandwidth(dev, latency),
        runtime=base.runtime,
        op_seconds=latency,
        load=None if load is None else round(load.average, 2),
        threads=torch.get_num_threads(),
    )


def _timed(fn: Any, dev: str, budget: float = 0.15, latency: float = 0.0) -> float:
    """Seconds per call of ``fn``, after a warm-up, over at least ``budget`` seconds, less
    ``latency`` (floored at a tenth of the call)."""
    import torch

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            per_call = elapsed / n
            return max(per_call - latency, per_call / 10)


def _matmul_rate(k: int, dev: str, dtype: Any, latency: float) -> float:
    import torch

    # As many rows as a few-thousand-token sequence: small products are overhead-bound.
    m = 4096 if k <= 1024 else 1024 if k <= 2048 else 256
    a = torch.randn(m, k, device=dev, dtype=dtype)
    b = torch.randn(k, k, device=dev, dtype=dtype)
    return 2.0 * m * k * k / _timed(lambda: a @ b, dev, latency=latency)


def _attention_rates(dev: str, dtype: Any, latency: float) -> dict[int, float]:
    import torch
    import torch.nn.functional as F

    heads, dim, rates = 2, 64, {}
    for length in _ATTENTION_LENGTHS:
        q, k, v = (torch.randn(1, heads, length, dim, device=dev, dtype=dtype) for _ in range(3))
        with torch.inference_mode():
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: B023, E731
            seconds = _timed(sdpa, dev, latency=latency)
        rates[length] = 2.0 * 2.0 * (length / 2) * heads * dim * length / seconds
    return rates


def _bandwidth(dev: str, latency: float) -> float:
    import torch

    n = 32 * 2**20  # 128 MiB of fp32: long enough that the op latency is a small part
    a, b = torch.randn(n, device=dev), torch.randn(n, device=dev)
    # a.add_(b): read a and b, write a.
    return 3 * 4 * n / _timed(lambda: a.add_(b, alpha=0.5), dev, latency=latency)


def _op_latency(dev: str) -> float:
    import torch

    # 64k elements: above torch's parallel grain, so the threads are woken and joined, as for
    # the model's own elementwise kernels; the arithmetic itself is negligible.
    # The median of 15 short batches: on a shared machine single measurements spike.
    x = torch.randn(256, 256, device=dev)
    return statistics.median(_timed(lambda: x + x, dev, budget=0.02) for _ in range(15))


def launched_rank() -> int | None:
    """This process's rank under torchrun / `accelerate launch` (``$RANK``); None when plain."""
    rank = os.environ.get("RANK", "").strip()
    return int(rank) if rank.isdigit() else None


def _standalone_env() -> dict[str, str]:
    """This process's environment without the launcher's variables (a plain process's)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)
    }


def measure_runtime(timeout: float = _PROBE_TIMEOUT) -> dict[str, int]:
    """Peak resident bytes of a fresh process after running a tiny model like each command.

    The process is a plain one even when this one was started by a launcher (see
    :data:`_LAUNCHER_VARS`); it is killed after ``timeout`` seconds.
    """
    code = "from ctxext.resources.probe import runtime_probe; runtime_probe()"
    env = {**_standalone_env(), "TRANSFORMERS_VERBOSITY": "error"}
    try:
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise CtxextError(
            f"could not measure the runtime's memory (no result in {timeout:g} s); try again "
            "when the machine is less busy"
        ) from None
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise CtxextError(f"could not measure the runtime's memory ({tail}); add --debug")
    return {k: int(v) for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def available_memory(device: str) -> tuple[int, str]:
    """Bytes a run may use on ``device`` and where that figure comes from."""
    if os.environ.get(MEMORY_LIMIT_ENV):
        text = os.environ[MEMORY_LIMIT_ENV]
        try:
            return parse_bytes(text), f"${MEMORY_LIMIT_ENV}"
        except ValueError as e:
            raise CtxextError(f"${MEMORY_LIMIT_ENV}: {e}") from None
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free), "free GPU memory"
    return _mem_available() + _current_rss(), "available RAM"


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _current_rss() -> int:
    # This process already holds part of what the estimate counts (the runtime).
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
