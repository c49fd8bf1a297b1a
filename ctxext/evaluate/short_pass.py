"""The short pass of LongCE and LongPPL (Fang et al. 2024; PKU-ML/LongPPL): which positions each
scored token reads. Pure functions, no torch, so that `ctxext finetune`'s cheap checks can use
them before anything heavy loads."""

from __future__ import annotations

__all__ = ["short_chunks", "short_stride"]


def short_stride(window: int) -> int:
    """The default stride S of the short pass: W/4, the reference's ratio (``sliding_window``
    1024 to ``trunc_len`` 4096, longppl/longppl.py lines 111-112; ``internal`` 1024 to 4096,
    finetune/finetune.py line 219). The far-context gain's local windows use the same default
    stride (:mod:`ctxext.evaluate.context_use`)."""
    return max(1, window // 4)


def short_chunks(length: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The short pass's chunks of a sequence of ``length`` positions, as (start, stop): chunk
    [start, stop) is one forward pass and scores the targets start + window .. stop - 1.

    The reference's (``trunc_len`` T = ``window``, ``sliding_window`` S = ``stride``), the same
    in both of its uses:

    - longppl/longppl.py lines 34-42 (key tokens): ``for start_token in range(0, max_len -
      trunc_len, sliding_window)``, the input ``input_ids[:, start_token: start_token +
      trunc_len + sliding_window]`` (the last chunk cut at the end, lines 35-36), scoring its
      last S targets, ``start_token + trunc_len ..``;
    - finetune/finetune.py lines 31-40 (LongCE's weights): the same loop (``internal`` = S),
      every other token's weight 1 (line 28).

    So target p >= T + S is scored in the chunk starting at S * floor((p - T) / S) and reads
    its last T to T + S - 1 positions: never fewer than T. The first chunk (start 0) reads
    targets T .. T + S - 1 from position 0, their whole context, so it is not run: those
    targets keep their full-context NLL (the same number the reference computes twice). Every
    target p >= T + S is in exactly one chunk.
    """
    return [
        (start, min(start + window + stride, length))
        for start in range(stride, length - window, stride)
    ]
