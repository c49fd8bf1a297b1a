"""Training data: documents packed into chunks, PoSE position ids, and the run's samples.

Sample number i of the run (0, 1, 2, ... over all optimizer steps) is a fixed chunk of packed
text (a per-epoch permutation seeded by ``seed``) and, with PoSE, fixed position ids (a
generator seeded by ``seed`` and i); see :mod:`ctxext.finetune`.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctxext.config import FinetuneConfig, MixSource, TaskOptions
from ctxext.errors import CtxextError
from ctxext.finetune.episodes import EPISODE_KEY, episode_ids

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
    ) -> None:
        self.chunks = chunks
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
    return _load_text(tokenizer, cfg, cfg.data, chunk_length, wanted, global_batch, progress)


def _load_text(
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
# Data mixes


def mix_draws(weights: Sequence[float], seed: int, count: int) -> list[int]:
    """The source of each of the run's first ``count`` samples: sample i draws source k with
    probability weights[k] / sum(weights), from a generator seeded by ``seed`` and i alone (a
    resumed run, or a run with more steps, draws the same sources for the same samples)."""
    total = float(sum(weights))
    bounds = list(itertools.accumulate(w / total for w in weights))
    last = max(k for k, w in enumerate(weights) if w > 0)  # rounding never picks weight 0
    return [
        min(bisect.bisect_right(bounds, random.Random(f"ctxext-mix:{seed}:{i}").random()), last)
        for i in range(count)
    ]


@dataclass
class MixPart:
    """One source of a mix: its spec, the samples of the run it gives, and (text) its chunks."""

    spec: MixSource
    samples: int
    data: TrainData | None = None  # text sources that are read (None: a task, or never read)
    order: ChunkOrder | None = None

    def summary(self, tasks: TaskOptions, length: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.spec.source,
            "kind": "task" if self.spec.is_task else "text",
            "weight": self.spec.weight,
            "samples": self.samples,
        }
        if self.spec.is_task:
            out["task"] = task_record(self.spec.source, tasks, length)
        elif self.data is not None:
            out.update({k: v for k, v in self.data.summary().items() if k != "source"})
        return out


def task_record(task: str, tasks: TaskOptions, length: int) -> dict[str, Any]:
    """The parameters of a task source, as provenance records them."""
    from ctxext.synthetic import train_templates

    params = {
        "retrieval": {"keys": 1, "queries": 1},
        "multikey": {"keys": tasks.keys, "queries": tasks.queries},
        "multihop": {"hops": tasks.hops},
    }[task]
    return {
        "name": task,
        **params,
        "length": length,
        "depths": "uniform over the filler; each fact at the nearest line start (mid-line "
        "where none is within 5% of the filler)",
        "filler": "the first text source of the mix",
        **(
            {}
            if tasks.min_length is None
            else {
                "lengths": f"episodes of log-uniform length {tasks.min_length}..{length} "
                "packed per sample, each with its own BOS and position ids from 0"
            }
        ),
        "templates": [t.name for t in train_templates()],
    }


@dataclass
class MixData:
    """A data mix: which source each sample of the run reads, and the sources' chunks.

    ``draws[i]`` is the source of sample i (:func:`mix_draws`), ``ranks[i]`` its index among
    that source's samples, and for a task sample ``fill[i]`` the read of the filler source
    (the first text source) its filler text comes from: after the filler source's own
    samples, so filler text is not also trained on directly while the source lasts.
    """

    parts: list[MixPart]
    main: int
    draws: list[int]
    ranks: list[int]
    fill: list[int]
    tokenizer: Any
    tasks: TaskOptions
    length: int
    seed: int
    fingerprint: str

    @property
    def chunks(self) -> Any:  # the filler source's chunks (what --resume rebuilds first)
        return self.parts[self.main].data.chunks

    def summary(self) -> dict[str, Any]:
        """The run summary's ``data`` record: the totals, and each source in ``mix``."""
        read = [p.data for p in self.parts if p.data is not None]
        label = ", ".join(f"{p.spec.source} {p.spec.weight:g}" for p in self.parts)
        return {
            "source": f"mix: {label}",
            "split": None,
            "fingerprint": self.fingerprint,
            "documents": sum(d.documents for d in read),
            "tokens": sum(d.tokens for d in read),
            "chunks": sum(int(d.chunks.shape[0]) for d in read),
            "mix": {
                "seed": self.seed,
                "filler": self.parts[self.main].spec.source,
                "sources": [p.summary(self.tasks, self.length) for p in self.parts],
            },
        }


def load_mix(
    tokenizer: Any,
    cfg: FinetuneConfig,
    chunk_length: int,
    count: int,
    progress: PackProgress | None = None,
) -> MixData:
    """The mix of ``cfg.mix`` for a run of ``count`` samples: the draws first, then each text
    source read as far as its samples (and the filler source also the tasks' filler) need.

    Task sources that cannot fit the training length are refused here, before any weight is
    loaded and before any text is read.
    """
    from ctxext.synthetic import check_mix_tasks_fit

    mix = list(cfg.mix or ())
    check_mix_tasks_fit(tokenizer, [m.source for m in mix if m.is_task], cfg.tasks, chunk_length)
    draws = mix_draws([m.weight for m in mix], cfg.seed, count)
    ranks, fill, seen, tasks_seen = [], [], [0] * len(mix), 0
    for k in draws:
        ranks.append(seen[k])
        seen[k] += 1
        fill.append(tasks_seen if mix[k].is_task else -1)
        tasks_seen += mix[k].is_task
    main = next(k for k, m in enumerate(mix) if not m.is_task)
    parts = []
    for k, m in enumerate(mix):
        reads = seen[k] + (tasks_seen if k == main else 0)
        part = MixPart(spec=m, samples=seen[k])
        if not m.is_task and reads:
            wanted = reads * chunk_length
            part.data = _load_text(tokenizer, cfg, m.source, chunk_length, wanted, 1, progress)
            # The first text source is ordered as a run without a mix orders its data, so a mix
            # of one text source trains exactly as that source alone.
            tag = f"ctxext-data:{cfg.seed}" if k == main else f"ctxext-data:{cfg.seed}:{k}"
            part.order = ChunkOrder(int(part.data.chunks.shape[0]), tag)
        parts.append(part)
    # The sources, their weights, what was read from each, and the task parameters.
    what = [[p.spec.source, p.spec.weight, p.data and p.data.fingerprint] for p in parts]
    what.append(cfg.tasks.model_dump(mode="json"))
    fingerprint = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]
    return MixData(
        parts=parts,
        main=main,
        draws=draws,
        ranks=ranks,
        fill=fill,
        tokenizer=tokenizer,
        tasks=cfg.tasks,
        length=chunk_length,
        seed=cfg.seed,
        fingerprint=fingerprint,
    )


class MixedSamples:
    """Map-style dataset of a mixed run's samples ``start .. start+count-1``.

    A text sample is a chunk of its source (see :func:`text_sample`); a task sample is built
    when read from a generator seeded by the run's seed and the sample number, with filler
    from the first text source, so every sample is a function of seed and sample number.
    """

    def __init__(self, mix: MixData, *, start: int, count: int, window: int | None = None) -> None:
        self.mix, self.start, self.count, self.window = mix, start, count, window

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> dict[str, Any]:
        import numpy as np
        import torch

        from ctxext.synthetic import packed_episodes, task_sequence

        if not 0 <= k < self.count:
            raise IndexError(k)
        mix, sample = self.mix, self.start + k
        part = mix.parts[mix.draws[sample]]
        if not part.spec.is_task:
            chunk = part.data.chunks[part.order(mix.ranks[sample])]
            out = text_sample(chunk, sample, mix.seed, self.window)
            if mix.tasks.min_length is not None:  # the batch's rows must have the same keys
                n = int(chunk.shape[0])
                out["position_ids"] = torch.arange(n)
                out["attention_mask"] = torch.ones(n, dtype=torch.long)
                out[EPISODE_KEY] = torch.zeros(n, dtype=torch.long)
            return out
        main = mix.parts[mix.main]
        filler = main.data.chunks[main.order(main.samples + mix.fill[sample])].tolist()
        rng = np.random.default_rng([mix.seed, sample, _TASK_STREAM])
        if mix.tasks.min_length is None:
            seq = task_sequence(mix.tokenizer, part.spec.source, mix.tasks, filler, mix.length, rng)
            ids = torch.tensor(seq.input_ids, dtype=torch.long)
            return {"input_ids": ids, "labels": ids}
        packed = packed_episodes(
            mix.tokenizer, part.spec.source, mix.tasks, filler, mix.length, rng
        )
        # Which episode each token is in: the training loop turns it into the block mask that
        # keeps the episodes apart (ctxext.finetune.episodes), folding in the all-ones padding
        # mask (nothing is padded). That mask is there on purpose: on its own it would let
        # episodes attend to each other, so isolation cannot rest on its absence.
        ids = torch.tensor(packed.input_ids, dtype=torch.long)
        return {
            "input_ids": ids,
            "labels": torch.tensor(packed.labels, dtype=torch.long),
            "position_ids": torch.tensor(packed.position_ids, dtype=torch.long),
            "attention_mask": torch.ones_like(ids),
            EPISODE_KEY: episode_ids([len(ep.input_ids) for ep in packed.episodes]),
        }


#: Mixed into the task generators' seeds (a stream of its own, apart from any other use of
#: the run's seed and sample number).
_TASK_STREAM = 0x7A5C


def train_loader(
    data: TrainData | MixData, cfg: FinetuneConfig, setup: RunSetup, start: int, global_batch: int
):
    """Sequential batches over the run's remaining samples; accelerate shards them by process."""
    from torch.utils.data import DataLoader

    remaining = max(0, cfg.steps * global_batch - start)
    window = setup.seq_length if cfg.pose else None
    if isinstance(data, MixData):
        dataset: Any = MixedSamples(data, start=start, count=remaining, window=window)
    else:
        dataset = PackedSamples(
            data.chunks, start=start, count=remaining, seed=cfg.seed, window=window
        )
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)
