"""Training data: documents packed into chunks, PoSE position ids, and the run's samples.

Sample number i of the run (0, 1, 2, ... over all optimizer steps) is a fixed chunk of packed
text (a per-epoch permutation seeded by ``seed``) and, with PoSE, fixed position ids (a
generator seeded by ``seed`` and i); see :mod:`ctxext.finetune`.
"""

from __future__ import annotations

import itertools
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctxext.config import FinetuneConfig
from ctxext.errors import CtxextError

if TYPE_CHECKING:
    from ctxext.finetune.setup import RunSetup


def pack_documents(
    token_lists: Sequence[Sequence[int]], bos_id: int | None, eos_id: int | None
) -> list[int]:
    """BOS + tokens + EOS per document, concatenated (the usual pre-training packing)."""
    stream: list[int] = []
    for ids in token_lists:
        if bos_id is not None:
            stream.append(bos_id)
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    return stream


def pose_position_ids(target_length: int, window: int, rng: random.Random) -> tuple[list[int], int]:
    """PoSE position ids for a ``window``-token sample that covers ``target_length`` positions.

    Two chunks as in the PoSE paper's code: the first (1 .. ceil(W/2) tokens) keeps positions
    0..l1-1; the second is shifted by a skip u ~ U[0, L - W], so its last position W-1+u reaches
    anywhere up to L-1. Returns the ids (strictly increasing) and l1, where the second chunk
    starts.
    """
    if not 2 <= window <= target_length:
        raise ValueError(f"window {window} must be in [2, {target_length}]")
    first = rng.randint(1, (window + 1) // 2)
    skip = rng.randint(0, target_length - window)
    return [*range(first), *(p + skip for p in range(first, window))], first


class PackedSamples:
    """Map-style dataset of a run's samples ``start .. start+count-1`` (see the package docstring).

    ``chunks`` is a LongTensor [n_chunks, target_length] of packed text. Without PoSE a sample
    is a whole chunk. With PoSE (``window`` set) it is the chunk's tokens *at* the PoSE
    position ids: the text keeps its true distances, and the label of the first token after the
    skip is ignored (its predecessor in the sample is not its predecessor in the text).
    """

    def __init__(
        self,
        chunks: Any,
        *,
        start: int,
        count: int,
        seed: int,
        window: int | None = None,
    ) -> None:
        self.chunks = chunks
        self.start = start
        self.count = count
        self.seed = seed
        self.window = window
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return self.count

    def chunk_index(self, sample: int) -> int:
        """Which chunk sample number ``sample`` of the run reads: a fresh permutation per epoch."""
        n = int(self.chunks.shape[0])
        epoch, offset = divmod(sample, n)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"ctxext-data:{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][offset]

    def __getitem__(self, k: int) -> dict[str, Any]:
        import torch

        if not 0 <= k < self.count:
            raise IndexError(k)
        sample = self.start + k
        chunk = self.chunks[self.chunk_index(sample)]
        if self.window is None:
            return {"input_ids": chunk, "labels": chunk}
        rng = random.Random(f"ctxext-pose:{self.seed}:{sample}")
        pos, split = pose_position_ids(int(chunk.shape[0]), self.window, rng)
        positions = torch.tensor(pos, dtype=torch.long)
        ids = chunk[positions]
        labels = ids.clone()
        if pos[split] != split:  # a real skip: do not learn to predict across it
            labels[split] = -100
        # An explicit all-ones mask: without it transformers reads a jump in position_ids as
        # the start of another packed sequence and would block attention across the skip.
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "attention_mask": torch.ones_like(ids),
        }


@dataclass
class TrainData:
    """Packed training chunks and where they came from."""

    chunks: Any  # torch.LongTensor [n_chunks, length]
    tokens: int
    documents: int
    fingerprint: str
    source: str
    split: str | None = None  # the dataset split read (None: not a split dataset)


def load_train_data(
    tokenizer: Any, cfg: FinetuneConfig, chunk_length: int, global_batch: int
) -> TrainData:
    """Pack the training part of the source into chunks; tokenize only as much as the run reads.

    Documents come in a seeded order, so stopping early still samples the whole source and the
    same options always give the same chunks (which is what makes --resume exact: the resumed
    run rebuilds them and continues at its sample count). A small source is shuffled whole; a
    streamed dataset through a seeded shuffle buffer, and reading stops at the tokens the run
    needs (held as int64, 8 bytes a token).
    """
    import torch

    from ctxext.data import TRAIN_SPLITS, Fingerprint, open_source

    source = open_source(
        cfg.data,
        split="train",
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        dataset_split=cfg.dataset_split,
        default_splits=TRAIN_SPLITS,
        fallback_encoding=cfg.fallback_encoding,
    )
    wanted = cfg.steps * global_batch * chunk_length
    # Small sources are tokenized 16 documents at a time (fast, and the chunks of the existing
    # runs stay what they were); a streamed dataset's documents can be whole books, so one at a
    # time: the run tokenizes little more than the tokens it needs.
    batch = 1 if source.streamed else 16
    stream, used, fingerprint = pack_until(
        _training_order(source, cfg), tokenizer, wanted, Fingerprint(), batch
    )
    n_chunks = len(stream) // chunk_length
    name = cfg.data or "stdlib"
    if n_chunks < global_batch:
        need = global_batch * chunk_length
        raise CtxextError(
            f"the training data ({name}) has {len(stream):,} tokens after packing, but one batch "
            f"of {global_batch} x {chunk_length} tokens needs at least {need:,}: add data or lower "
            "--batch-size/--grad-accum/--target-length"
        )
    chunks = torch.frombuffer(stream, dtype=torch.long)[: n_chunks * chunk_length].clone()
    return TrainData(
        chunks=chunks.view(n_chunks, chunk_length),
        tokens=len(stream),
        documents=used,
        fingerprint=fingerprint.hexdigest(),
        source=name,
        split=source.split,
    )


def _training_order(source: Any, cfg: FinetuneConfig) -> Iterator[Any]:
    """The documents in the run's seeded order (see :func:`load_train_data`)."""
    if source.streamed:
        return source.walk(cfg.seed, cfg.shuffle_buffer)
    docs = list(source.documents)
    random.Random(f"ctxext-docs:{cfg.seed}").shuffle(docs)
    return iter(docs)


def pack_until(
    docs: Iterator[Any], tokenizer: Any, wanted: int, fingerprint: Any, batch: int = 16
) -> tuple[array, int, Any]:
    """Tokenize and pack documents, ``batch`` at a time, until ``wanted`` tokens (or the end).

    Returns the packed tokens, how many documents were read, and ``fingerprint`` fed with them.
    """
    from ctxext.data import tokenize_documents

    stream = array("q")
    used = 0
    while len(stream) < wanted:
        chunk = list(itertools.islice(docs, batch))
        if not chunk:
            break
        ids = tokenize_documents(tokenizer, chunk)
        stream.extend(pack_documents(ids, tokenizer.bos_token_id, tokenizer.eos_token_id))
        for doc in chunk:
            fingerprint.update(doc)
        used += len(chunk)
    return stream, used, fingerprint


def train_loader(
    data: TrainData, cfg: FinetuneConfig, setup: RunSetup, start: int, global_batch: int
):
    """Sequential batches over the run's remaining samples; accelerate shards them by process."""
    from torch.utils.data import DataLoader

    remaining = max(0, cfg.steps * global_batch - start)
    dataset = PackedSamples(
        data.chunks,
        start=start,
        count=remaining,
        seed=cfg.seed,
        window=setup.seq_length if cfg.pose else None,
    )
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
