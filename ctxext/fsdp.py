"""FSDP2 where Accelerate's FSDP plugin does not run: CPU processes (gloo).

``accelerate launch --config_file X`` with ``distributed_type: FSDP`` exports the FSDP options
as environment variables (ACCELERATE_USE_FSDP, FSDP_VERSION, ...). On GPUs Accelerate then
shards the model itself (``DistributedType.FSDP``). On CPU-only machines Accelerate 1.x starts
the processes as plain data-parallel workers (``DistributedType.MULTI_CPU``) and ignores the
FSDP options: the model would be replicated, not sharded, without a word. This module applies
the same options with PyTorch's FSDP2 directly (``fully_shard`` on every decoder layer, then on
the root), so the same config file shards on CPU too, and it carries the parts Accelerate would
otherwise carry: sharded checkpoints (torch.distributed.checkpoint, one file per rank, through
Accelerate's public save/load-state hooks) and the full state dict gathered at the end.

Nothing here runs unless the launcher asked for FSDP and Accelerate did not take it.
"""

from __future__ import annotations

import os
from typing import Any

from ctxext.errors import CtxextError

__all__ = ["SHARDS_DIR", "cpu_fsdp_plugin", "full_state_dict", "register_checkpoint_hooks", "shard"]

#: Subfolder of a checkpoint holding the model + optimizer shards (torch.distributed.checkpoint).
SHARDS_DIR = "fsdp_shards"


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def cpu_fsdp_plugin(acc: Any) -> Any | None:
    """Accelerate's FSDP options when the launcher asked for FSDP on CPU processes, else None.

    Options this CPU path does not implement are refused with one line rather than ignored.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not _fsdp_requested() or acc.distributed_type != DistributedType.MULTI_CPU:
        return None
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if plugin.fsdp_version != 2:
        raise CtxextError(
            f"ctxext runs FSDP2 only (the config has fsdp_version: {plugin.fsdp_version}): set "
            "fsdp_version: 2 in the accelerate config"
        )
    if plugin.cpu_offload is not None and getattr(plugin.cpu_offload, "offload_params", False):
        raise CtxextError("fsdp_offload_params has no meaning on CPU processes: set it to false")
    if acc.mixed_precision != "no":  # the unprepared model gets no autocast from Accelerate
        raise CtxextError(
            f"FSDP on CPU processes trains in float32, not {acc.mixed_precision}: pass "
            "--dtype auto or --dtype float32"
        )
    if plugin.activation_checkpointing:
        raise CtxextError(
            "fsdp_activation_checkpointing is not applied on CPU processes: set it to false and "
            "pass --grad-ckpt"
        )
    return plugin


def _layer_classes(model: Any, plugin: Any) -> set[str]:
    """Decoder-layer class names to shard one by one (the config's, else the model's own)."""
    names = plugin.transformer_cls_names_to_wrap
    if isinstance(names, str):
        names = names.split(",")
    found = {n.strip() for n in names or [] if n.strip()}
    if not found:
        base = getattr(model, "get_base_model", lambda: model)()
        found = set(getattr(base, "_no_split_modules", None) or [])
    present = {type(m).__name__ for m in model.modules()}
    missing = found - present
    if not found or missing:
        raise CtxextError(
            f"fsdp_transformer_layer_cls_to_wrap names {sorted(missing) or 'nothing'}, which this "
            f"model does not have; use its decoder layer class (e.g. {_guess_layer(present)})"
        )
    return found


def _guess_layer(present: set[str]) -> str:
    layers = sorted(n for n in present if n.endswith(("DecoderLayer", "Block", "Layer")))
    return layers[0] if layers else "LlamaDecoderLayer"


def shard(model: Any, plugin: Any) -> Any:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, output head).

    Each layer's parameters are all-gathered just before its forward and backward and freed
    after (reshard_after_forward), so a rank holds 1/N of the weights, gradients and AdamW
    state plus one layer at a time in full.
    """
    from torch.distributed.fsdp import fully_shard

    reshard = plugin.reshard_after_forward
    if not isinstance(reshard, bool):  # Accelerate may keep the env string
        reshard = str(reshard).lower() != "false"
    classes = _layer_classes(model, plugin)
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def register_checkpoint_hooks(acc: Any, model: Any, optimizer: Any) -> None:
    """Make ``acc.save_state``/``load_state`` also write/read the sharded model and optimizer.

    Accelerate saves what it prepared (scheduler, RNG states); the sharded model and its
    optimizer are not prepared by it, so each rank writes its own shard of both with
    torch.distributed.checkpoint (a collective: every rank calls save_state/load_state).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def save(_models: Any, _weights: Any, output_dir: str) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=_shards(output_dir))

    def load(_models: Any, input_dir: str) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=_shards(input_dir))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def _shards(folder: str) -> str:
    return os.path.join(folder, SHARDS_DIR)


def full_state_dict(model: Any, main: bool) -> dict[str, Any] | None:
    """The whole model's state dict on the main process, gathered shard by shard to CPU
    (a collective: every rank calls it); None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return state if main else None
