"""`ctxext finetune`: a short long-context fine-tune (full or LoRA, optionally PoSE) on Accelerate.

Scaling the rotary frequencies gets a model most of the way to a longer context; a few hundred
steps at the new length close the rest (YaRN: 400 steps, lr 2e-5, AdamW betas (0.9, 0.95), 20
warm-up steps). This module runs that step and always writes a plain, merged Hugging Face
checkpoint whose config.json is exactly what `ctxext extend` writes.

Files of a run writing OUT::

    OUT.ctxext-work/                  while training (a sibling of OUT, removed on success)
        run.json                      what the run is; --resume refuses a different run
        log.jsonl                     one line per optimizer step
        checkpoints/step-000050/      accelerator.save_state (model, optimizer, scheduler, RNG)
                                      + trainer_state.json (step, data position, tokens, time)
    OUT/                              appears in one rename once training is done: the merged
                                      model, tokenizer, training_log.jsonl, loss.png, provenance

Checkpoints are written into ``checkpoints/.tmp-step-N`` and renamed when complete, so a
hard kill leaves either a complete checkpoint or a temporary folder that resuming ignores.

Determinism: sample number i of the run (0, 1, 2, ... over all optimizer steps) is a fixed
chunk of packed text (a per-epoch permutation seeded by ``seed``) and, with PoSE, fixed position
ids (a generator seeded by ``seed`` and i). Optimizer step s consumes samples
[s*G, (s+1)*G) with G = batch_size x processes x grad_accum, however they are split between
processes and accumulation steps: a 2-process run and a 1-process run with the same G see the
same data, and a resumed run continues from sample step*G.

This module imports no torch at import time: recipes reuse :class:`FinetuneConfig`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import shutil
import time
import warnings
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxext.config import Dtype, ExtendConfig, StrictModel, known_encoding
from ctxext.data import DEFAULT_SHUFFLE_BUFFER
from ctxext.errors import CtxextError

__all__ = [
    "FinetuneConfig",
    "PackedSamples",
    "ProgressFn",
    "pack_documents",
    "pack_until",
    "pose_position_ids",
    "run_finetune",
    "work_dir",
]

#: progress(event, info): events "status" {message}, "start" {total, completed},
#: "step" (a log record), "checkpoint" {step, path}.
ProgressFn = Callable[[str, dict[str, Any]], None]

LrSchedule = Literal["constant", "cosine", "linear"]
TrainablePart = Literal["embed", "norm"]

WORK_SUFFIX = ".ctxext-work"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
#: Older complete checkpoints beyond this many are deleted (each holds optimizer state too).
KEEP_CHECKPOINTS = 2
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Options that may differ between the first attempt and a --resume of the same run.
_RESUME_FREE = ("save_every",)
MANIFEST_FILE = "manifest.json"
#: Fault injection for tests and drills: the loss of this optimizer step (1-based) is made NaN
#: (read once per run; the divergence check then stops the run as it would a real blow-up).
INJECT_NAN_ENV = "CTXEXT_INJECT_NAN_AT_STEP"


class TrainingDiverged(CtxextError):
    """A non-finite loss or gradient norm: the run stops (exit code 1), checkpoints intact."""

    exit_code = 1


class _NonFinite(Exception):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(what)
        self.what, self.value = what, value


# --------------------------------------------------------------------------- configuration


class FinetuneConfig(StrictModel):
    """`ctxext finetune` options (also the ``finetune:`` section of a recipe)."""

    steps: int = 400
    """Optimizer steps (YaRN: 400)."""
    lr: float = 2e-5
    """Peak learning rate (YaRN: 2e-5; a tiny model or LoRA usually wants more)."""
    warmup_steps: int | float = 0.05
    """Linear warm-up from 0 to lr, read as transformers' TrainingArguments reads it: a whole
    number of steps (YaRN: 20), or a fraction below 1 of ``steps``, rounded up. The default 0.05
    is YaRN's 20 of 400 steps, and 1 step of a 5-step test run (a fixed 20 would keep such a
    run at a fraction of lr throughout). More warm-up steps than steps is refused."""
    lr_schedule: LrSchedule = "constant"
    """After warm-up: constant (YaRN), cosine (to 10% of lr) or linear (to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to matrices only (YaRN: 0)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (YaRN: 0.9)."""
    adam_beta2: float = 0.95
    """AdamW beta2 (YaRN: 0.95)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    batch_size: int = 1
    """Sequences per process per micro-step; global batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    train_length: int | None = None
    """Tokens per training sequence (default: the target length). With pose: the window W."""
    pose: bool = False
    """PoSE: train on train_length-token windows whose position ids are spread over the whole
    target length (two chunks, the second shifted by a random skip)."""
    lora_rank: int | None = None
    """LoRA rank on every linear projection; None fine-tunes all weights."""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 x rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_trainable: tuple[TrainablePart, ...] = ("embed", "norm")
    """With LoRA, also train these fully (LongLoRA: embeddings and norms matter for long
    context); give an empty list or 'none' to train the adapters only."""
    grad_ckpt: bool = False
    """Gradient checkpointing: recompute activations in the backward pass (less memory)."""
    save_every: int = 50
    """Write a resumable checkpoint every N optimizer steps (0: never)."""
    seed: int = 0
    """Seed of data order, PoSE skips and LoRA initialisation."""
    data: str | None = None
    """Training text: 'stdlib' (default: the bundled model's training part), a text file, a
    folder, a .jsonl file or a Hugging Face dataset name."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.json files and datasets."""
    dataset_config: str | None = None
    """Config (subset) of a Hugging Face dataset, e.g. wikitext-103-raw-v1."""
    dataset_split: str | None = None
    """Split of a Hugging Face dataset; None reads train."""
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    """Documents in the seeded shuffle buffer a streamed dataset is read through."""
    fallback_encoding: str | None = None
    """Encoding for data files that are not UTF-8 (e.g. latin-1); None refuses them."""
    dtype: Dtype = "auto"
    """Compute dtype: auto = bf16 autocast on CUDA (fp32 master weights), fp32 on CPU."""

    @field_validator("steps", "batch_size", "grad_accum", "shuffle_buffer")
    @classmethod
    def _positive_int(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    _encoding = field_validator("fallback_encoding")(known_encoding)

    @field_validator("save_every")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"must be 0 or a positive integer (got {v})")
        return v

    @field_validator("warmup_steps")
    @classmethod
    def _warmup(cls, v: int | float) -> int | float:
        if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
            raise ValueError(
                f"must be a whole number of steps or a fraction below 1 of steps (got {v}), "
                "e.g. 20 or 0.05"
            )
        return int(v) if v >= 1 else v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a finite number > 0 (got {v}), e.g. 2e-5")
        return v

    @field_validator("weight_decay", "lora_dropout")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not math.isfinite(v) or not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1) (got {v})")
        return v

    @field_validator("adam_beta1", "adam_beta2")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1) (got {v})")
        return v

    @field_validator("max_grad_norm", "lora_alpha")
    @classmethod
    def _positive_float(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    @field_validator("lora_rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"must be a positive integer (got {v}); omit it for a full fine-tune")
        return v

    @field_validator("train_length")
    @classmethod
    def _train_length(cls, v: int | None) -> int | None:
        if v is not None and v < 2:
            raise ValueError(f"must be at least 2 tokens (got {v})")
        return v

    @field_validator("lora_trainable", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        # The CLI and recipes may write "embed,norm"; "none" or "" means adapters only.
        if isinstance(v, str):
            items = [p.strip() for p in v.split(",") if p.strip()]
            return () if items in ([], ["none"]) else tuple(items)
        return v

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> FinetuneConfig:
        if self.warmup() > self.steps:
            # ctx["at"]: the error names finetune.warmup_steps (and its recipe line)
            raise PydanticCustomError(
                "warmup_too_long",
                "{warmup} warm-up steps are more than steps ({steps}): lr would never be "
                "reached; give fewer warm-up steps or a fraction of steps such as 0.05",
                {"warmup": self.warmup(), "steps": self.steps, "at": ("warmup_steps",)},
            )
        return self

    def warmup(self) -> int:
        """Warm-up steps of this run: warmup_steps itself, or that fraction of steps."""
        w = self.warmup_steps
        return int(w) if w >= 1 else math.ceil(w * self.steps)

    @model_validator(mode="after")
    def _pose_needs_window(self) -> FinetuneConfig:
        if self.pose and self.train_length is None:
            raise ValueError(
                "pose needs train_length (the window W, e.g. the trained length): "
                "add --train-length"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The options that define a run (a resume must repeat them)."""
        return self.model_dump(mode="json", exclude=set(_RESUME_FREE))


# --------------------------------------------------------------------------- data


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
    """Map-style dataset of one run's samples ``start .. start+count-1`` (see module docstring).

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


# --------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Everything decided before any weight is loaded or any file written."""

    source: Any  # checkpoint.ResolvedModel
    config_before: dict[str, Any]
    extend: ExtendConfig | None
    method: str
    factor: float
    trained_length: int
    target_length: int
    seq_length: int  # tokens per training sequence (W with PoSE)
    out: Path
    work: Path
    nan_at_step: int | None = None  # fault injection ($CTXEXT_INJECT_NAN_AT_STEP)


def work_dir(out: Path) -> Path:
    """The sibling folder a run of ``out`` trains in (checkpoints, log)."""
    out = out.expanduser().absolute()
    return out.parent / f"{out.name}{WORK_SUFFIX}"


def plan_run(
    model: str | None,
    output: Path,
    extend: ExtendConfig | None,
    cfg: FinetuneConfig,
    *,
    resume: bool,
    overwrite: bool,
) -> Plan:
    """Validate the request against the model's config and the file system (no writes)."""
    from ctxext import checkpoint, rope
    from ctxext.modeling import check_causal_lm

    source = checkpoint.resolve_model(model)
    config = checkpoint.read_config(source.path)
    check_causal_lm(config, source.name)
    info = rope.analyze(config)
    if extend is not None and info.existing_scaling is not None:
        raise CtxextError(
            f"{source.name} is already extended ({info.existing_scaling.get('rope_type')}): omit "
            "--method/--factor to fine-tune it at its extended length, or pass the base model"
        )
    if extend is not None:
        factor = rope.validate_request(info, extend.method, extend.factor, extend.target_length)
        method = extend.method
    else:
        method, factor = _existing_extension(info, source.name)
    target = rope.new_length(info.trained_length, factor)
    seq = cfg.train_length or target
    if seq > target:
        raise CtxextError(
            f"train length {seq} is longer than the target length {target}: pass "
            f"--train-length <= {target} (PoSE windows are usually the trained length, "
            f"{info.trained_length})"
        )
    out = checkpoint.check_output_path(output, [source.path], overwrite=True)
    work = work_dir(out)
    _check_output_state(out, work, resume=resume, overwrite=overwrite)
    return Plan(
        source=source,
        config_before=config,
        extend=extend,
        method=method,
        factor=factor,
        trained_length=info.trained_length,
        target_length=target,
        seq_length=seq,
        out=out,
        work=work,
        nan_at_step=_injected_nan_step(),
    )


def _injected_nan_step() -> int | None:
    value = os.environ.get(INJECT_NAN_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _existing_extension(info: Any, name: str) -> tuple[str, float]:
    """Method and factor of a checkpoint `ctxext extend` already wrote (no --method given)."""
    existing = info.existing_scaling
    if existing is None:
        raise CtxextError(
            f"{name} is not extended yet: pass --method and --factor (or --target-length), or a "
            "checkpoint written by `ctxext extend`"
        )
    kind = str(existing.get("rope_type", "default"))
    if kind == "default":  # ctxext's static NTK: theta enlarged, lengths recorded
        return "ntk", existing["max_position_embeddings"] / info.trained_length
    factor = existing.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise CtxextError(
            f"{name} has rope scaling {kind} without a factor > 1; pass the base model with "
            "--method and --factor instead"
        )
    return kind, float(factor)


def _check_output_state(out: Path, work: Path, *, resume: bool, overwrite: bool) -> None:
    """The output/--resume/--overwrite rules, checked before anything is loaded."""
    if resume and overwrite:
        raise CtxextError("--resume and --overwrite exclude each other: pick one")
    if resume:
        if newest_checkpoint(work) is None:
            done = " (the run already finished)" if out.exists() and not work.exists() else ""
            raise CtxextError(
                f"--resume: no complete checkpoint in {work}{done}; start without --resume "
                "(checkpoints are written every --save-every steps)"
            )
        return
    if overwrite:
        return
    if newest_checkpoint(work) is not None:
        raise CtxextError(
            f"an interrupted run of {out} is in {work}: pass --resume to continue it or "
            "--overwrite to start over"
        )
    if out.exists():
        raise CtxextError(
            f"output folder {out} already exists; pass --overwrite to replace it (or --resume "
            "to continue an interrupted run)"
        )


def newest_checkpoint(work: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary folders are ignored)."""
    folder = work / "checkpoints"
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def newest_intact_checkpoint(work: Path, report: ProgressFn | None = None) -> Path | None:
    """The newest complete checkpoint whose files match its manifest (sizes, sha256) and
    whose safetensors files are whole; each damaged newer one is reported and skipped."""
    folder = work / "checkpoints"
    done = sorted(
        (p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
        if folder.is_dir()
        else [],
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
        reverse=True,
    )
    skipped: list[str] = []
    for ckpt in done:
        if not (ckpt / STATE_FILE).is_file():
            continue
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if skipped and report is not None:
                report("warning", {"message": f"{'; '.join(skipped)}; resuming from {ckpt.name}"})
            return ckpt
        skipped.append(f"skipping damaged checkpoint {ckpt.name} ({problem})")
    if skipped:
        raise CtxextError(
            f"--resume: every checkpoint in {work} is damaged ({skipped[-1]}); start over "
            "with --overwrite"
        )
    return None


def _manifest(folder: Path) -> dict[str, Any]:
    from ctxext.checkpoint import file_sha256

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST_FILE, STATE_FILE):
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"files": files}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None if it can): a file missing, of another size
    or hash than its manifest says, or a safetensors file whose header and size disagree."""
    from ctxext.checkpoint import file_sha256

    path = ckpt / MANIFEST_FILE
    listed: dict[str, Any] = {}
    if path.is_file():  # checkpoints of older versions have none: check what can be checked
        try:
            listed = json.loads(path.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST_FILE} is unreadable"
    for rel, want in listed.items():
        file = ckpt / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size:,} bytes, the manifest says {want['size']:,}"
    for file in sorted(ckpt.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.relative_to(ckpt).as_posix()} {problem}"
    for rel, want in listed.items():  # sizes first: hashing is the slow part
        if file_sha256(ckpt / rel) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensor data;
    the last tensor's end offset must be exactly where the file ends."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"is truncated ({size:,} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return "has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None


# --------------------------------------------------------------------------- model


def _is_norm(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith(("Norm", "RMSNorm", "LayerNorm")) or "Norm" in name


def prepare_model(lm: Any, cfg: FinetuneConfig) -> tuple[Any, int, int]:
    """Make ``lm`` trainable as asked: all weights, or LoRA (+ embeddings/norms).

    Returns (model, trainable parameters, all parameters). LoRA targets every linear
    projection ("all-linear" leaves out the output head); embeddings and norms are trained in
    place (requires_grad), so merge_and_unload keeps them and no module copies are made.
    """
    import torch

    lm.config.use_cache = False
    if cfg.grad_ckpt:
        _enable_checkpointing(lm)
    model = lm
    if cfg.lora_rank is not None:
        from peft import get_peft_model

        torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: make them reproducible
        lora = _lora_config(cfg)
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecated
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(lm, lora)
        extra = []
        if "embed" in cfg.lora_trainable:
            extra += list(lm.get_input_embeddings().parameters())
        if "norm" in cfg.lora_trainable:
            extra += [p for m in lm.modules() if _is_norm(m) for p in m.parameters()]
        for p in extra:
            p.requires_grad_(True)
            if p.dtype != torch.float32:  # optimizer updates are lost in bf16 weights
                p.data = p.data.float()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, trainable, total


def _lora_config(cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def _enable_checkpointing(lm: Any) -> None:
    """Non-reentrant activation checkpointing (works with frozen LoRA bases and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_optimizer(model: Any, cfg: FinetuneConfig) -> Any:
    """AdamW over the trainable parameters; weight decay on matrices only."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of lr at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    warmup = cfg.warmup()
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.lr_schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def _mixed_precision(dtype: str, device: str) -> str:
    """Accelerate's mixed_precision for a compute dtype: weights stay fp32, matmuls autocast."""
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "no"
    return {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]


# --------------------------------------------------------------------------- the run


@dataclass
class _State:
    """Where training stands; saved with every checkpoint (trainer_state.json)."""

    step: int = 0
    samples: int = 0  # data position: samples of the run consumed so far
    tokens: int = 0
    elapsed: float = 0.0
    resumed_from: int | None = None


def run_finetune(
    model: str | None,
    output: Path,
    extend: ExtendConfig | None,
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    budget_check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` at the extended length and write a merged checkpoint to ``output``.

    Under ``accelerate launch`` every process runs this; they train data-parallel and only the
    main process writes files. Returns the summary (the same on every process).
    ``budget_check()`` (the CLI's memory/time check) runs once the cheap checks have passed,
    before torch is imported.
    """
    plan = plan_run(model, output, extend, cfg, resume=resume, overwrite=overwrite)
    if budget_check is not None:
        budget_check()
    from accelerate import Accelerator  # only now: a refused request never waits for torch

    from ctxext import checkpoint
    from ctxext.modeling import default_device, load_tokenizer

    device = default_device()
    _check_context_parallel_device(device)  # before Accelerate, which refuses it with a traceback
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=_mixed_precision(cfg.dtype, device),
        step_scheduler_with_optimizer=False,  # else it steps once per process per step
        # Without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) must
        # be told they are CPU workers to join one gloo group (MULTI_CPU) instead of each
        # training alone.
        cpu=device == "cpu",
    )
    report = _reporter(progress, acc.is_main_process)
    global_batch = cfg.batch_size * cfg.grad_accum * _data_parallel_size(acc)
    _check_parallelism(acc, plan.seq_length)
    # Data first: a source too small for one batch is reported before any weight is loaded.
    report("status", {"message": "packing training data"})
    plan.source = checkpoint.fetch(plan.source, "tokenizer")  # a Hub model: no weights yet
    tokenizer = load_tokenizer(plan.source.path, trust_remote_code)
    # PoSE windows are cut from target-length chunks; plain training reads whole chunks.
    chunk_length = plan.target_length if cfg.pose else plan.seq_length
    data = load_train_data(tokenizer, cfg, chunk_length, global_batch)
    identity = _run_identity(plan, cfg, global_batch, data.fingerprint)
    if resume:
        _check_same_run(plan.work, identity)
    report("status", {"message": f"loading {plan.source.name}"})
    loaded, lm = _load(plan, cfg, trust_remote_code, allow_pickle, report)
    net, trainable, total = prepare_model(lm, cfg)
    state = _State()
    ckpt = newest_intact_checkpoint(plan.work, report) if resume else None
    if ckpt is not None:
        state = _State(**json.loads((ckpt / STATE_FILE).read_text()))
        state.resumed_from = state.step
    loader = _loader(data, cfg, plan, state.samples, global_batch)
    net, opt, loader, sched = _prepare(acc, net, loader, cfg)
    if not resume:  # only now: a run that fails to start leaves nothing behind
        _create_work_dir(acc, plan, identity)
    if ckpt is not None:
        report("status", {"message": f"resuming from {ckpt.name}"})
        acc.load_state(str(ckpt))
    if acc.is_main_process:
        _trim_log(plan.work / LOG_FILE, state.step)

    summary_base = {
        "output": str(plan.out),
        "method": plan.method,
        "factor": plan.factor,
        "trained_length": plan.trained_length,
        "target_length": plan.target_length,
        "train_length": plan.seq_length,
        "pose": cfg.pose,
        "lora_rank": cfg.lora_rank,
        "global_batch": global_batch,
        "warmup_steps": cfg.warmup(),
        "num_processes": acc.num_processes,
        "data_parallel_size": _data_parallel_size(acc),
        "fsdp": _fsdp_mode(acc),
        "trainable_parameters": trainable,
        "parameters": total,
        "data": {
            "source": data.source,
            "split": data.split,
            "fingerprint": data.fingerprint,
            "documents": data.documents,
            "tokens": data.tokens,
            "chunks": int(data.chunks.shape[0]),
        },
    }
    report("start", {"total": cfg.steps, "completed": state.step})
    last_loss = _train(acc, net, opt, sched, loader, state, cfg, plan, global_batch, report)
    summary = {
        **summary_base,
        "steps": cfg.steps,
        "resumed_from_step": state.resumed_from,
        "final_loss": last_loss,
        "tokens": state.tokens,
        "seconds": round(state.elapsed, 2),
        "tokens_per_s": round(state.tokens / state.elapsed, 1) if state.elapsed else None,
    }
    report("status", {"message": f"writing {plan.out}"})
    _finish(acc, net, loaded, plan, cfg, summary)
    return summary


def _reporter(progress: ProgressFn | None, main: bool) -> ProgressFn:
    def report(event: str, info: dict[str, Any]) -> None:
        if progress is not None and main:
            progress(event, info)

    return report


def _run_identity(
    plan: Plan, cfg: FinetuneConfig, global_batch: int, data_fingerprint: str
) -> dict[str, Any]:
    from ctxext import checkpoint

    return {
        "model": str(plan.source.path),
        "config_sha256": checkpoint.config_hash(plan.config_before),
        "extend": plan.extend.model_dump(mode="json") if plan.extend else None,
        "finetune": cfg.identity(),
        "global_batch": global_batch,
        "data_fingerprint": data_fingerprint,
    }


def _create_work_dir(acc: Any, plan: Plan, identity: dict[str, Any]) -> None:
    """A fresh work folder (replacing one without checkpoints, or any with --overwrite)."""
    if acc.is_main_process:
        if plan.work.exists():
            shutil.rmtree(plan.work)
        (plan.work / "checkpoints").mkdir(parents=True)
        _write_json_atomic(plan.work / RUN_FILE, {"identity": identity, "output": str(plan.out)})
    acc.wait_for_everyone()


def _check_same_run(work: Path, now: dict[str, Any]) -> None:
    """--resume must repeat the run's options: name the first one that differs."""
    run_file = work / RUN_FILE
    before = json.loads(run_file.read_text())["identity"] if run_file.is_file() else {}
    flat_before, flat_now = _flatten(before), _flatten(now)
    for key in sorted(set(flat_before) | set(flat_now)):
        if flat_before.get(key) != flat_now.get(key):
            raise CtxextError(
                f"--resume: the run in {work} was started with {key}={flat_before.get(key)!r}, "
                f"not {flat_now.get(key)!r}; repeat its options or pass --overwrite to start over"
            )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load(
    plan: Plan,
    cfg: FinetuneConfig,
    trust_remote_code: bool,
    allow_pickle: bool,
    report: ProgressFn,
):
    """Load with the extension applied in memory. Full fine-tunes keep fp32 master weights;
    LoRA keeps the frozen base in the compute dtype (peft keeps adapters in fp32)."""
    from ctxext import checkpoint
    from ctxext.modeling import default_device, load_causal_lm

    plan.source = checkpoint.fetch(
        plan.source, "weights", allow_pickle=allow_pickle, progress=_download_status(report)
    )
    dtype = "float32"
    if cfg.lora_rank is not None and cfg.dtype != "auto":
        dtype = cfg.dtype
    elif cfg.lora_rank is not None and default_device().startswith("cuda"):
        dtype = "bfloat16"
    loaded = load_causal_lm(
        str(plan.source.path),
        extend=plan.extend,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    return loaded, loaded.model


def _download_status(report: ProgressFn) -> Callable[[str, int], Callable[[int], None]]:
    """Weight downloads as "status" events (the CLI shows them in its spinner line)."""

    def bar(what: str, total: int) -> Callable[[int], None]:
        def update(done: int) -> None:
            message = f"{what}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB"
            report("status", {"message": message})

        return update

    return bar


def _loader(data: TrainData, cfg: FinetuneConfig, plan: Plan, start: int, global_batch: int):
    """Sequential batches over the run's remaining samples; accelerate shards them by process."""
    from torch.utils.data import DataLoader

    remaining = max(0, cfg.steps * global_batch - start)
    dataset = PackedSamples(
        data.chunks,
        start=start,
        count=remaining,
        seed=cfg.seed,
        window=plan.seq_length if cfg.pose else None,
    )
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=0)


def _train(
    acc: Any,
    net: Any,
    opt: Any,
    sched: Any,
    loader: Any,
    state: _State,
    cfg: FinetuneConfig,
    plan: Plan,
    global_batch: int,
    report: ProgressFn,
) -> float | None:
    """The optimizer-step loop; returns the last step's loss (mean over the global batch)."""
    tokens_per_step = global_batch * plan.seq_length
    started, tokens_at_start, elapsed_at_start = time.perf_counter(), state.tokens, state.elapsed
    batches = iter(loader)
    loss_value = None
    log = (plan.work / LOG_FILE).open("a", encoding="utf-8") if acc.is_main_process else None
    try:
        while state.step < cfg.steps:
            lr = opt.param_groups[0]["lr"]
            poison = plan.nan_at_step == state.step + 1
            try:
                loss_value, grad_norm = _one_step(acc, net, opt, sched, batches, cfg, poison)
            except _NonFinite as e:
                raise _diverged(plan.work, state.step + 1, e) from None
            state.step += 1
            state.samples += global_batch
            state.tokens += tokens_per_step
            run_time = time.perf_counter() - started
            state.elapsed = elapsed_at_start + run_time
            record = {
                "step": state.step,
                "loss": round(loss_value, 6),
                "grad_norm": round(grad_norm, 6),
                "lr": lr,
                "tokens": state.tokens,
                "tokens_per_s": round((state.tokens - tokens_at_start) / max(run_time, 1e-9), 1),
                "elapsed": round(state.elapsed, 3),
            }
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            report("step", record)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
                path = _save_checkpoint(acc, plan.work, state)
                report("checkpoint", {"step": state.step, "path": str(path)})
    finally:
        if log is not None:
            log.close()
    return loss_value


def _one_step(
    acc: Any, net: Any, opt: Any, sched: Any, batches: Any, cfg: FinetuneConfig, poison: bool
) -> tuple[float, float]:
    """grad_accum micro-steps and one optimizer step; returns the loss averaged over all
    processes and the global gradient norm before clipping.

    Both are checked before the optimizer steps: a non-finite one raises _NonFinite and the
    weights, optimizer state and schedule stay as the previous step left them.
    """
    total = 0.0
    mean, norm = math.nan, math.nan
    for _ in range(cfg.grad_accum):
        inputs, context = _model_inputs(acc, next(batches))
        with acc.accumulate(net), context:
            loss = net(**inputs).loss
            if poison:  # fault injection: a real NaN, through the real backward pass
                loss = loss * math.nan
            acc.backward(loss)
            if acc.sync_gradients:
                step_loss = (total + loss.detach()) / cfg.grad_accum
                mean = acc.reduce(step_loss, reduction="mean").item()
                # max_norm=inf measures the norm without scaling the gradients.
                limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                norm = float(acc.clip_grad_norm_(net.parameters(), limit))
                for what, value in (("loss", mean), ("gradient norm", norm)):
                    if not math.isfinite(value):
                        raise _NonFinite(what, value)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        total = total + loss.detach()
    return mean, norm


def _diverged(work: Path, step: int, e: _NonFinite) -> TrainingDiverged:
    last = newest_checkpoint(work)
    where = (
        f"the last complete checkpoint is {last} (continue with --resume)"
        if last is not None
        else "no checkpoint was written yet (--save-every)"
    )
    return TrainingDiverged(
        f"training diverged at step {step}: the {e.what} is {e.value}; that step was not "
        f"applied and the run stopped; {where}, or start over with a lower --lr or "
        "--max-grad-norm (--overwrite)"
    )


def _check_parallelism(acc: Any, seq_length: int) -> None:
    """Refuse, in one line and before anything is loaded, sharding setups that cannot run here:
    FSDP options the CPU path does not implement, CP slices that do not divide the sequence."""
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    fsdp.cpu_fsdp_plugin(acc)  # raises on FSDP options the CPU path does not implement
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise CtxextError(
            "ctxext runs FSDP2 only (the accelerate config has fsdp_version: 1): set "
            "fsdp_version: 2"
        )
    cp = _cp_size(acc)
    if cp > 1 and seq_length % (2 * cp):
        raise CtxextError(
            f"context parallelism over {cp} ranks needs sequences divisible by "
            f"{2 * cp} tokens (load-balanced slices); {seq_length} is not: "
            "change --target-length/--train-length"
        )


def _check_context_parallel_device(device: str) -> None:
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


def _prepare(acc: Any, net: Any, loader: Any, cfg: FinetuneConfig) -> tuple[Any, Any, Any, Any]:
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


def _fsdp_mode(acc: Any) -> str | None:
    """How the model is sharded: Accelerate's FSDP2 (GPUs), ctxext's FSDP2 (CPU), or None."""
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    if acc.distributed_type == DistributedType.FSDP:
        return "accelerate"
    return "ctxext-cpu" if fsdp.cpu_fsdp_plugin(acc) is not None else None


def _cp_size(acc: Any) -> int:
    pc = getattr(acc, "parallelism_config", None)
    return pc.cp_size if pc is not None and pc.cp_enabled else 1


def _data_parallel_size(acc: Any) -> int:
    """Processes that read different samples (context/tensor-parallel peers share a batch)."""
    pc = getattr(acc, "parallelism_config", None)
    if pc is not None and pc.total_size > 1:
        return pc.data_parallel_size
    return acc.num_processes


def _model_inputs(acc: Any, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
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


def _save_checkpoint(acc: Any, work: Path, state: _State) -> Path:
    """accelerate's save_state into a temporary folder, renamed when every process is done."""
    folder = work / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{state.step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        # Sizes and hashes of every file, so a resume can tell a damaged checkpoint.
        _write_json_atomic(tmp / MANIFEST_FILE, _manifest(tmp))
        saved = {k: v for k, v in state.__dict__.items() if k != "resumed_from"}
        _write_json_atomic(tmp / STATE_FILE, saved)
        _fsync_dir(tmp)
        if final.exists():  # left over from an attempt that got further than this one
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        _prune_checkpoints(folder)
    acc.wait_for_everyone()
    return final


def _prune_checkpoints(folder: Path) -> None:
    done = sorted(
        (p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines after the checkpoint we resume from (those steps are trained again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by a kill: everything after it is gone too
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


# --------------------------------------------------------------------------- output


def _finish(
    acc: Any, net: Any, loaded: Any, plan: Plan, cfg: FinetuneConfig, summary: dict[str, Any]
) -> None:
    """Merge LoRA, write the checkpoint atomically (main process), then drop the work folder."""
    acc.wait_for_everyone()
    model = _final_model(acc, net, loaded, cfg)
    if acc.is_main_process:
        if cfg.lora_rank is not None:
            model = model.merge_and_unload()
        _write_output(model, loaded, plan, cfg, summary)
        shutil.rmtree(plan.work, ignore_errors=True)
    acc.wait_for_everyone()


def _final_model(acc: Any, net: Any, loaded: Any, cfg: FinetuneConfig) -> Any:
    """The trained model as one whole module on the main process (None elsewhere).

    Data parallel: the main process's replica is complete. FSDP: parameters are sharded, so
    every rank joins in gathering the full state dict, which the main process loads into a
    fresh CPU copy of the same architecture (and the same LoRA wrapping) before merging.
    """
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    if fsdp.cpu_fsdp_plugin(acc) is not None:
        state = fsdp.full_state_dict(net, acc.is_main_process)  # a collective
    elif acc.distributed_type != DistributedType.FSDP:
        return acc.unwrap_model(net) if acc.is_main_process else None
    else:
        state = acc.get_state_dict(net)  # a collective: all ranks call it
    if not acc.is_main_process:
        return None
    return rebuild_model(loaded.config, cfg, state)


def rebuild_model(config: dict[str, Any], cfg: FinetuneConfig, state: dict[str, Any]) -> Any:
    """A CPU model built from ``config`` (LoRA-wrapped like training) holding ``state``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctxext.modeling import build_config

    # Built for real on the CPU (not on "meta"): buffers outside the state dict, such as the
    # rotary inverse frequencies, must be computed from the config.
    model = AutoModelForCausalLM.from_config(build_config(config, False), dtype=torch.float32)
    if cfg.lora_rank is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, _lora_config(cfg))
    model.load_state_dict(state, strict=True)
    return model


def _save_dtype(config: dict[str, Any]):  # -> torch.dtype
    """Weights are written in the dtype the source checkpoint declares (fp32 if none)."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)


def _write_output(
    model: Any, loaded: Any, plan: Plan, cfg: FinetuneConfig, summary: dict[str, Any]
) -> None:
    from ctxext import checkpoint
    from ctxext.report import plot_loss

    with checkpoint.atomic_output(plan.out) as tmp:
        model.to(_save_dtype(loaded.config))
        model.save_pretrained(tmp)
        _usual_file_modes(tmp)
        # The config the model was built from, i.e. exactly what `ctxext extend` writes
        # (rope_parameters, legacy rope_scaling mirror, top-level rope_theta, lengths).
        checkpoint.write_json(tmp / "config.json", loaded.config)
        _write_tokenizer(loaded.tokenizer, plan.source.path, tmp, plan.target_length)
        _write_generation_config(plan.source.path, tmp, plan.target_length)
        log = plan.work / LOG_FILE
        if log.is_file():
            shutil.copy2(log, tmp / "training_log.jsonl")
            plot_loss(read_log(log), tmp / "loss.png")
        checkpoint.write_json(
            tmp / checkpoint.PROVENANCE_FILE, _provenance(loaded, plan, cfg, summary)
        )


def _usual_file_modes(folder: Path) -> None:
    """Weights get the mode every other output file gets (0666 minus the umask).

    transformers writes them through a private temporary file, so they arrive 0600: another
    user, or a serving container running as another uid, could read config.json but not the
    weights. Only files save_pretrained just created are touched (never a link to an input).
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.glob("model*.safetensors*"):
        path.chmod(0o666 & ~umask)


def _write_tokenizer(tokenizer: Any, src: Path, dst: Path, new_length: int) -> None:
    """The source's tokenizer files verbatim, with model_max_length set to the new length."""
    from ctxext import checkpoint

    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile((src / name).resolve(), dst / name)
            copied = True
    if not copied:
        tokenizer.save_pretrained(dst)
    path = dst / "tokenizer_config.json"
    tok = checkpoint.read_json(path, "") if path.is_file() else {}
    checkpoint.write_json(path, {**tok, "model_max_length": new_length})


def _write_generation_config(src: Path, dst: Path, new_length: int) -> None:
    """Mirror the source: its generation_config.json (max_length raised), or none at all."""
    from ctxext import checkpoint

    path = src / "generation_config.json"
    if not path.is_file():
        (dst / "generation_config.json").unlink(missing_ok=True)
        return
    gen = checkpoint.read_json(path, "")
    if isinstance(gen.get("max_length"), int) and gen["max_length"] < new_length:
        gen["max_length"] = new_length  # a stale default would silently cap generation
    checkpoint.write_json(dst / "generation_config.json", gen)


def _provenance(
    loaded: Any, plan: Plan, cfg: FinetuneConfig, summary: dict[str, Any]
) -> dict[str, Any]:
    from ctxext import checkpoint

    return {
        "tool": "ctxext finetune",
        "source": plan.source.record(),
        "method": plan.method,
        "factor": plan.factor,
        "trained_length": plan.trained_length,
        "new_length": plan.target_length,
        "extend": plan.extend.model_dump(mode="json") if plan.extend else None,
        "finetune": cfg.model_dump(mode="json"),
        "config_sha256_before": checkpoint.config_hash(plan.config_before),
        "config_sha256_after": checkpoint.config_hash(loaded.config),
        "training": summary,
        "versions": checkpoint.versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def read_log(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a training_log.jsonl / log.jsonl."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
