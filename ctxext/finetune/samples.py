"""The run's samples: a single text source (:mod:`ctxext.finetune.data`) or a data mix
(:mod:`ctxext.finetune.mix`), read in order by the training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ctxext.config import FinetuneConfig
from ctxext.finetune.data import PackedSamples, PackProgress, TrainData, load_text
from ctxext.finetune.mix import MixData, MixedSamples, load_mix
from ctxext.finetune.short import ShortBatches

if TYPE_CHECKING:
    from ctxext.finetune.setup import RunSetup


def load_train_data(
    tokenizer: Any,
    cfg: FinetuneConfig,
    chunk_length: int,
    global_batch: int,
    progress: PackProgress | None = None,
) -> TrainData | MixData:
    """Pack the training part of the source into chunks; tokenize only as much as the run reads.

    Documents come in a seeded order, so stopping early still samples the whole source and the
    same options always give the same chunks (which is what makes --resume exact: the resumed
    run rebuilds them and continues at its sample count). A small source is shuffled whole; a
    streamed dataset through a seeded shuffle buffer, and reading stops at the tokens the run
    needs (held as int64, 8 bytes a token). A mix (``cfg.mix``) reads each text source as far
    as its share of the run's samples needs (see :func:`load_mix`). ``progress`` is told the
    tokens packed so far after every batch of documents.
    """
    if cfg.mix is not None:
        return load_mix(tokenizer, cfg, chunk_length, cfg.steps * global_batch, progress)
    wanted = cfg.steps * global_batch * chunk_length
    return load_text(tokenizer, cfg, cfg.data, chunk_length, wanted, global_batch, progress)


def train_loader(
    data: TrainData | MixData, cfg: FinetuneConfig, setup: RunSetup, start: int, global_batch: int
):
    """Sequential batches over the run's remaining samples; accelerate shards them by process."""
    from torch.utils.data import DataLoader

    remaining = max(0, cfg.steps * global_batch - start)
    window = setup.seq_length if cfg.pose else None
    short = ShortBatches(cfg.short_fraction, setup.trained_length, cfg.batch_size, cfg.seed)
    if isinstance(data, MixData):
        dataset: Any = MixedSamples(data, start=start, count=remaining, window=window, short=short)
    else:
        dataset = PackedSamples(
            data.chunks, start=start, count=remaining, seed=cfg.seed, window=window, short=short
        )
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
