"""Data mixes: which source each sample of the run reads (text sources and synthetic tasks),
and the samples of a mixed run (see ``--mix`` in :mod:`ctxext.finetune`)."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ctxext.config import FinetuneConfig, MixSource, TaskOptions
from ctxext.finetune.data import ChunkOrder, PackProgress, TrainData, load_text, text_sample
from ctxext.finetune.episodes import EPISODE_KEY, episode_ids
from ctxext.finetune.short import ShortBatches, short_task_sample, short_text_sample


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
            part.data = load_text(tokenizer, cfg, m.source, chunk_length, wanted, 1, progress)
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

    def __init__(
        self,
        mix: MixData,
        *,
        start: int,
        count: int,
        window: int | None = None,
        short: ShortBatches | None = None,
    ) -> None:
        self.mix, self.start, self.count, self.window = mix, start, count, window
        self.short = short

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
        short = self.short is not None and self.short.is_short(sample)
        if not part.spec.is_task:
            chunk = part.data.chunks[part.order(mix.ranks[sample])]
            if short:
                return short_text_sample(chunk, self.short.length)
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
        if short:
            return short_task_sample(
                mix.tokenizer,
                part.spec.source,
                mix.tasks,
                filler,
                mix.length,
                self.short.length,
                rng,
            )
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
