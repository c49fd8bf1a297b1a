"""Accelerate, FSDP2 and context parallelism: setup checks, wrapping, per-step inputs."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ctxext.config import FinetuneConfig
from ctxext.device import compute_dtype
from ctxext.errors import CtxextError
from ctxext.finetune.optim import lr_factor, make_optimizer


def mixed_precision(dtype: str, device: str) -> str:
    """Accelerate's mixed_precision for a compute dtype: weights stay fp32, matmuls autocast."""
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[compute_dtype(dtype, device)]


def accelerator_precision(mixed: str) -> None:
    """Let this process's next Accelerator take ``mixed`` precision: Accelerate keeps one state
    per process and raises (a traceback) on an Accelerator with another precision, so a second
    fine-tune in one process (a library user, the tests) with another dtype would fail. The
    process group (Accelerate's PartialState) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


def check_parallelism(acc: Any, seq_length: int, loss: str = "ce") -> None:
    """Refuse, in one line and before anything is loaded, sharding setups that cannot run here:
    FSDP options the CPU path does not implement, CP slices that do not divide the sequence,
    LongCE under CP (its short pass reads whole sequences, which CP ranks do not hold)."""
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    fsdp.cpu_fsdp_plugin(acc)  # raises on FSDP options the CPU path does not implement
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise CtxextError(
            "ctxext runs FSDP2 only (the accelerate config has fsdp_version: 1): set "
            "fsdp_version: 2"
        )
    cp = _cp_size(acc)
    if cp > 1 and loss == "longce":
        raise CtxextError(
            "--loss longce does not run under context parallelism (each rank holds a slice of "
            "a sequence; the short pass reads whole ones): use --loss ce or drop "
            "parallelism_config_cp_size"
        )
    if cp > 1 and seq_length % (2 * cp):
        raise CtxextError(
            f"context parallelism over {cp} ranks needs sequences divisible by "
            f"{2 * cp} tokens (load-balanced slices); {seq_length} is not: "
            "change --target-length/--train-length"
        )


def check_context_parallel_device(device: str) -> None:
    """Context parallelism (torch's ring attention under FSDP2) runs on CUDA GPUs only: it
    exchanges keys/values over NCCL and dispatches SDPA's flash / memory-efficient / cuDNN
    kernels. Elsewhere (CPU processes, gloo) it is refused here, in one line."""
    cp = int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1") or 1)
    if cp > 1 and not device.startswith("cuda"):
        raise CtxextError(
            f"context parallelism (parallelism_config_cp_size: {cp}) needs CUDA GPUs with SDPA "
            f"flash/memory-efficient attention; this process runs on {device}: remove "
            "parallelism_config_cp_size from the accelerate config (or use --pose for long targets)"
        )


def prepare(acc: Any, net: Any, loader: Any, cfg: FinetuneConfig) -> tuple[Any, Any, Any, Any]:
    """Shard or wrap the model, then build the optimizer and schedule and hand them to Accelerate.

    With an FSDP config on CPU processes (which Accelerate runs as plain data parallel),
    ctxext shards the model with FSDP2 itself and the optimizer is built over the shards; the
    sharded model and optimizer are saved/loaded by hooks on Accelerate's save/load_state.
    """
    import torch

    from ctxext import fsdp

    plugin = fsdp.cpu_fsdp_plugin(acc)
    if plugin is not None:
        net = fsdp.shard(net, plugin)
    opt = make_optimizer(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    if plugin is None:
        return acc.prepare(net, opt, loader, sched)
    loader, sched = acc.prepare(loader, sched)
    fsdp.register_checkpoint_hooks(acc, net, opt)
    return net, opt, loader, sched


def fsdp_mode(acc: Any) -> str | None:
    """How the model is sharded: Accelerate's FSDP2 (GPUs), ctxext's FSDP2 (CPU), or None."""
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    if acc.distributed_type == DistributedType.FSDP:
        return "accelerate"
    return "ctxext-cpu" if fsdp.cpu_fsdp_plugin(acc) is not None else None


def _cp_size(acc: Any) -> int:
    pc = getattr(acc, "parallelism_config", None)
    return pc.cp_size if pc is not None and pc.cp_enabled else 1


def data_parallel_size(acc: Any) -> int:
    """Processes that read different samples (context/tensor-parallel peers share a batch)."""
    pc = getattr(acc, "parallelism_config", None)
    if pc is not None and pc.total_size > 1:
        return pc.data_parallel_size
    return acc.num_processes


def model_inputs(acc: Any, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The forward's inputs, and the context to run it in.

    Under context parallelism (accelerate ParallelismConfig cp_size > 1, FSDP2) every rank of a
    CP group holds a slice of each sequence: labels are shifted *before* slicing (a slice
    cannot shift across its boundary), position ids are explicit so each slice knows where it
    is, and the attention mask goes (CP runs causal SDPA without masks).
    """
    if _cp_size(acc) == 1:
        return batch, contextlib.nullcontext()
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    pos = batch.get("position_ids")
    if pos is None:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
    buffers = [ids, shifted, pos]
    context = acc.maybe_context_parallel(
        buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)
    )
    inputs = {"input_ids": ids, "labels": shifted, "shift_labels": shifted, "position_ids": pos}
    return inputs, context
