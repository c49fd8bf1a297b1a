"""Packed task episodes, isolated by construction: an explicit block-diagonal causal mask.

With ``--task-min-length`` a task sample packs several independent episodes end to end (see
:func:`ctxext.synthetic.packed_episodes`). The samples carry ``episode_ids`` (which episode
each token belongs to; 0 everywhere in a text sample of the same mix), and each batch becomes
an additive 4-D mask [batch, 1, L, L]: 0 where key <= query in the same episode, the dtype's
minimum elsewhere. transformers passes a 4-D mask through as given, to SDPA and to eager
attention alike, so isolation holds whatever else is in the batch (a 2-D padding mask is
folded in and replaced).

Why not rely on transformers' packed-sequence detection (position ids that restart at 0)?
It applies only when *no* attention mask is passed and no KV cache is used: one all-ones mask
in the batch and episode 2 silently attends to episode 1. flash-attention's varlen path would
avoid the L x L mask but runs only on CUDA with flash_attn installed, and ctxext loads every
model with SDPA. The explicit mask works for SDPA and eager on every architecture; its cost is
one L x L tensor per sequence (:func:`mask_bytes`, counted by ``ctxext plan``).

Why additive in the compute dtype rather than bool? SDPA converts a bool mask to a float
one on every call, and under autograd each layer would keep its own converted copy for the
backward (layers x L x L). A float mask already in the dtype the queries have (the autocast
dtype, else fp32) goes through uncast: every layer shares the one tensor. Its last dimension
is allocated padded to a multiple of 16 so the memory-efficient CUDA kernel needs no aligned
copy either. (Read from torch's SDPA dispatch, not yet measured on a GPU.) A batch whose rows
are one episode each gets no mask (plain causal attention, SDPA's fastest kernels); with that,
training gives bitwise the weights the implicit packing gave.

Where the mask cannot express the model's attention, task episodes are refused before anything
loads (:func:`check_episodes_supported`): context parallelism (torch's ring attention runs
causal SDPA without masks over slices of the sequence) and sliding-window or chunked layers
narrower than the training length (a 4-D mask replaces the model's own window).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ctxext.errors import CtxextError

#: The batch key of the per-token episode index (dropped before the forward).
EPISODE_KEY = "episode_ids"
#: Attention implementations that take an additive 4-D mask as given.
_MASKED_ATTENTION = ("sdpa", "eager")
#: The mask's last dimension is padded to a multiple of this (memory-efficient SDPA alignment).
_ALIGN = 16


def mask_bytes(batch: int, length: int, dtype_bytes: int) -> int:
    """Bytes of one batch's episode mask (what :func:`episode_mask` allocates)."""
    return batch * length * (length + -length % _ALIGN) * dtype_bytes


def check_episodes_supported(config: dict[str, Any], seq_length: int) -> None:
    """Refuse, in one line and before torch loads, setups where packed episodes cannot be kept
    apart by a mask: context parallelism, and windowed attention narrower than the sequence."""
    cp = int(os.environ.get("PARALLELISM_CONFIG_CP_SIZE", "1") or 1)
    if cp > 1:
        raise CtxextError(
            f"task episodes (--task-min-length) need an attention mask and context parallelism "
            f"(parallelism_config_cp_size: {cp}) runs attention without one: drop "
            "--task-min-length or parallelism_config_cp_size"
        )
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    c = {**config, **(text or {})}
    windows = []
    if c.get("sliding_window") and c.get("use_sliding_window", True) is not False:
        windows.append(("sliding window", int(c["sliding_window"])))
    if c.get("attention_chunk_size"):
        windows.append(("attention chunk", int(c["attention_chunk_size"])))
    for what, size in windows:
        if size < seq_length:
            raise CtxextError(
                f"task episodes (--task-min-length) replace the model's attention mask and its "
                f"{what} ({size} tokens) is shorter than the training length {seq_length}: "
                f"train at most {size} tokens or drop --task-min-length"
            )


def episode_ids(lengths: list[int]) -> Any:
    """LongTensor [sum(lengths)]: 0 for the first episode's tokens, 1 for the next, ..."""
    import torch

    sizes = torch.tensor(lengths, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths)), sizes)


def episode_mask(ids: Any, dtype: Any, attention_mask: Any = None) -> Any:
    """The additive mask [B, 1, L, L] in ``dtype`` that lets a token see only earlier tokens of
    its own episode (``ids`` [B, L]), and none where a 2-D ``attention_mask`` has 0."""
    import torch

    b, n = ids.shape
    allowed = (ids[:, :, None] == ids[:, None, :]).tril_()  # same episode, key <= query
    if attention_mask is not None:
        allowed &= attention_mask[:, None, :].bool()
    size = (b, 1, n, n + -n % _ALIGN)
    out = torch.full(size, torch.finfo(dtype).min, dtype=dtype, device=ids.device)[..., :n]
    out[:, 0].masked_fill_(allowed, 0)
    return out


def with_episode_mask(batch: dict[str, Any], implementation: str, dtype: Any) -> dict[str, Any]:
    """``batch`` with its ``episode_ids`` turned into the 4-D ``attention_mask``."""
    if implementation not in _MASKED_ATTENTION:
        raise CtxextError(
            f"task episodes (--task-min-length) need attention that takes a 4-D mask "
            f"({' or '.join(_MASKED_ATTENTION)}); this model runs {implementation}: drop "
            "--task-min-length"
        )
    out = dict(batch)
    ids = out.pop(EPISODE_KEY)
    mask = out.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"a batch with episodes has a {mask.dim()}-D attention mask")
    if not bool((ids != 0).any()):
        # One episode per row (text rows of the mix, single-episode task samples): nothing to
        # keep apart, and plain causal attention keeps SDPA's fastest kernels.
        return out
    out["attention_mask"] = episode_mask(ids, dtype, mask)
    return out


def isolated_batches(batches: Iterator[dict[str, Any]], model: Any, dtype: Any) -> Iterator:
    """``batches`` with an episode mask wherever they carry ``episode_ids`` (the others as
    they are); ``model`` says which attention implementation reads the mask."""
    config = model.config
    for batch in batches:
        if EPISODE_KEY in batch:
            yield with_episode_mask(batch, config._attn_implementation, dtype)
        else:
            yield batch


def mask_dtype(mixed_precision: str) -> Any:
    """The dtype attention's queries have under Accelerate's ``mixed_precision`` (ctxext keeps
    fp32 weights without it: see finetune.loop._load)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
