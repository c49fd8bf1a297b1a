"""Training data: documents packed into chunks, PoSE position ids, and the run's samples.

Sample number i of the run (0, 1, 2, ... over all optimizer steps) is a fixed chunk of packed
text (a per-epoch permutation seeded by ``seed``) and, with PoSE, fixed position ids (a
generator seeded by ``seed`` and i); see :mod:`ctxext.finetune`.
"""

from __future__ import annotations

import itertools
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ctxext.config import FinetuneConfig
from ctxext.errors import CtxextError
from ctxext.finetune.short import ShortBatches, short_text_sample


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


class ChunkOrder:
    """Which chunk the i-th read of a source takes: a fresh seeded permutation per epoch."""

    def __init__(self, n_chunks: int, tag: str) -> None:
        self.n, self.tag = n_chunks, tag
        self._perm: tuple[int, list[int]] | None = None

    def __call__(self, i: int) -> int:
        epoch, offset = divmod(i, self.n)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(self.n))
            random.Random(f"{self.tag}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][offset]


def text_sample(chunk: Any, sample: int, seed: int, window: int | None) -> dict[str, Any]:
    """Sample number ``sample`` of the run read from a packed ``chunk``: the whole chunk, or
    with PoSE (``window`` set) the chunk's tokens *at* the PoSE position ids: the text keeps its
    true distances, and the label of the first token after the skip is ignored (its
    predecessor in the sample is not its predecessor in the text)."""
    import torch

    if window is None:
        return {"input_ids": chunk, "labels": chunk}
    rng = random.Random(f"ctxext-pose:{seed}:{sample}")
    pos, split = pose_position_ids(int(chunk.shape[0]), window, rng)
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


class PackedSamples:
    """Map-style dataset of a run's samples ``start .. start+count-1`` (see the package docstring).

    ``chunks`` is a LongTensor [n_chunks, target_length] of packed text; each sample is one
    chunk (see :func:`text_sample`; with PoSE, ``window`` tokens of it).
    """

    def __init__(
        self,
        chunks: Any,
        *,
        start: int,
        count: int,
        seed: int,
        window: int | None = None,
        short: ShortBatches | None = None,
    ) -> None:
        self.chunks = chunks
        self.short = short
        self.start = start
        self.count = count
        self.seed = seed
        self.window = window
        self.chunk_index = ChunkOrder(int(chunks.shape[0]), f"ctxext-data:{seed}")

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict[str, Any]:
        if not 0 <= k < self.count:
            raise IndexError(k)
        sample = self.start + k
        chunk = self.chunks[self.chunk_index(sample)]
        if self.short is not None and self.short.is_short(sample):
            return short_text_sample(chunk, self.short.length)
        return text_sample(chunk, sample, self.seed, self.window)


@dataclass
class TrainData:
    """Packed training chunks and where they came from."""

    chunks: Any  # torch.LongTensor [n_chunks, length]
    tokens: int
    documents: int
    fingerprint: str
    source: str
    split: str | None = None  # the dataset split read (None: not a split dataset)

    def summary(self) -> dict[str, Any]:
        """The run summary's ``data`` record."""
        return {
            "source": self.source,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "documents": self.documents,
            "tokens": self.tokens,
            "chunks": int(self.chunks.shape[0]),
        }


#: progress(source, tokens_packed, tokens_wanted): called as a text source is packed.
PackProgress = Callable[[str, int, int], None]


def load_text(
    tokenizer: Any,
    cfg: FinetuneConfig,
    spec: str | None,
    chunk_length: int,
    wanted: int,
    min_chunks: int,
    progress: PackProgress | None = None,
) -> TrainData:
    """``wanted`` tokens of one text source packed into chunks (at least ``min_chunks``)."""
    import torch

    from ctxext.data import TRAIN_SPLITS, Fingerprint, open_source

    source = open_source(
        spec,
        split="train",
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        dataset_split=cfg.dataset_split,
        default_splits=TRAIN_SPLITS,
        fallback_encoding=cfg.fallback_encoding,
    )
    # Small sources are tokenized 16 documents at a time (fast, and the chunks of the existing
    # runs stay what they were); a streamed dataset's documents can be whole books, so one at a
    # time: the run tokenizes little more than the tokens it needs.
    batch = 1 if source.streamed else 16
    name = spec or "stdlib"
    tick = None if progress is None else lambda done: progress(name, done, wanted)
    stream, used, fingerprint = pack_until(
        _training_order(source, cfg), tokenizer, wanted, Fingerprint(), batch, tick
    )
    n_chunks = len(stream) // chunk_length
    if n_chunks < min_chunks:
        need = min_chunks * chunk_length
        what = (
            f"one batch of {min_chunks} x {chunk_length} tokens"
            if cfg.mix is None
            else f"its share of the mix ({min_chunks} x {chunk_length} tokens at least)"
        )
        raise CtxextError(
            f"the training data ({name}) has {len(stream):,} tokens after packing, but {what} "
            f"needs at least {need:,}: add data or lower --batch-size/--grad-accum/"
            "--target-length"
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
    docs: Iterator[Any],
    tokenizer: Any,
    wanted: int,
    fingerprint: Any,
    batch: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[array, int, Any]:
    """Tokenize and pack documents, ``batch`` at a time, until ``wanted`` tokens (or the end).

    Returns the packed tokens, how many documents were read, and ``fingerprint`` fed with them;
    ``progress(tokens_packed)`` is called after every batch.
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
        if progress is not None:
            progress(len(stream))
    return stream, used, fingerprint


# ---------------------------------------------------------------------------------------------
