"""Mixed context-window training: some batches packed as episodes no longer than the trained
length (``short_fraction``), so the short mode of a model keeps being trained.

Why: a model extended with ``--keep-short`` (or a longrope checkpoint with its own short
factors) runs sequences up to its trained length L with the trained frequencies and longer
ones with the rescaled frequencies; transformers picks the set per forward pass from the
largest position id. A fine-tune at the target length trains the rescaled mode only, and the
shared weights drift away from what the short mode needs (measured on the bundled model:
held-out retrieval at 256 drops from 67% to 27-36% in prose). LongRoPE2 (Shang et al. 2025,
section 3.3) trains both modes at once: short sequences with the original rotary embedding
and long ones rescaled. Here a short batch keeps the sequence length of the run (the same cost
per step) but splits each row into episodes of at most L tokens, position ids from 0 in each
and a block mask between them (:mod:`ctxext.finetune.episodes`), so no position reaches L and
the whole batch runs in the short mode.

Which batches are short is drawn per batch (a function of the run's seed and the batch
number, so a resumed run draws the same), because the mode is chosen per forward pass: one
long row would switch a whole batch to the long factors.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctxext.finetune.episodes import EPISODE_KEY, episode_ids


@dataclass(frozen=True)
class ShortBatches:
    """Which batches of a run are short, and how long their episodes may be."""

    fraction: float
    """Share of the run's batches packed as short episodes."""
    length: int
    """Longest episode: the model's trained length."""
    batch_size: int
    seed: int

    def is_short(self, sample: int) -> bool:
        """Whether sample number ``sample`` of the run is in a short batch."""
        if self.fraction <= 0:
            return False
        batch = sample // self.batch_size
        return random.Random(f"ctxext-short:{self.seed}:{batch}").random() < self.fraction


def short_text_sample(chunk: Any, length: int) -> dict[str, Any]:
    """A packed text ``chunk`` cut into consecutive episodes of ``length`` tokens (the last may
    be shorter): the same tokens and next-token targets, each episode seeing only itself. The
    last token of an episode still predicts the next token of the text, from its own episode's
    context, as the last token of any chunk does."""
    import torch

    n = int(chunk.shape[0])
    index = torch.arange(n)
    return {
        "input_ids": chunk,
        "labels": chunk,
        "position_ids": index % length,
        "attention_mask": torch.ones(n, dtype=torch.long),
        EPISODE_KEY: index // length,
    }


def short_task_sample(
    tokenizer: Any,
    task: str,
    options: Any,
    filler: Sequence[int],
    total: int,
    length: int,
    rng: Any,
) -> dict[str, Any]:
    """``total`` tokens of ``task`` episodes, packed ``length`` tokens at a time as
    :func:`ctxext.synthetic.packed_episodes` packs a sample (episodes of log-uniform length
    min(options.min_length, length) .. length), so no episode is longer than ``length``."""
    import torch

    from ctxext.synthetic import packed_episodes

    low = min(options.min_length or length, length)
    short_options = options.model_copy(update={"min_length": low})
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    sizes: list[int] = []
    while len(ids) < total:
        start, n = len(ids), min(length, total - len(ids))
        if n < low:  # a tail too short for the task: the filler text, as its own episode
            piece = list(filler[start : start + n])
            ids += piece
            labels += [-100, *piece[1:]]
            positions += range(n)
            sizes.append(n)
            break
        packed = packed_episodes(tokenizer, task, short_options, filler[start:], n, rng)
        ids += packed.input_ids
        # The first target of a later pack would be predicted across the episode boundary.
        labels += [-100, *packed.labels[1:]] if start else packed.labels
        positions += packed.position_ids
        sizes += [len(ep.input_ids) for ep in packed.episodes]
    tensor = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": tensor,
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "attention_mask": torch.ones_like(tensor),
        EPISODE_KEY: episode_ids(sizes),
    }
