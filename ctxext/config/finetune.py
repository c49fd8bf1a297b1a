"""`ctxext finetune`: the run, its data mix and the synthetic task sources."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ctxext.config.base import AttnImplementation, Dtype, StrictModel, known_encoding
from ctxext.data import DEFAULT_SHUFFLE_BUFFER

LrSchedule = Literal["constant", "cosine", "linear"]
TrainablePart = Literal["embed", "norm"]
Loss = Literal["ce", "longce"]
# Options that may differ between the first attempt and a --resume of the same run.
_RESUME_FREE = ("save_every",)
#: Names of the synthetic task sources of a data mix (see :mod:`ctxext.synthetic`); these names
#: mean the task even where a file or folder of that name exists (write ./retrieval for it).
TASK_SOURCES = ("retrieval", "multikey", "multihop")
# Options added after run.json existed: left out of a run's identity at their defaults, so an
# interrupted run of an older version still resumes.
_NEW_OPTIONS = ("mix", "tasks", "loss", "longce_window", "longce_stride", "short_fraction")


class TaskOptions(StrictModel):
    """Parameters of the synthetic task sources (see :mod:`ctxext.synthetic`)."""

    keys: int = 4
    """multikey: facts (NAME = KEY lines) hidden per sequence."""
    queries: int = 2
    """multikey: how many of them are asked for at the end."""
    hops: int = 4
    """multihop: references in the chain NAME_0 = KEY, NAME_1 = NAME_0, ... (hops + 1 facts)."""
    min_length: int | None = None
    """Pack each task sample with independent episodes of log-uniform length min_length ..
    the training length (each with its own BOS, position ids from 0, and attention only within
    itself), so the task is trained at every length and distance up to the target, not only at
    the full length. None: one episode of the full training length."""

    composed: float = 0.0
    """Probability that a fact is in a composed training form (syntax drawn from parts,
    ctxext.evaluate.composed, as the bundled model was trained) instead of a form of the
    training grid. Neither is ever a held-out form. 0: the grid only."""

    @field_validator("composed")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"must be a probability in [0, 1] (got {v})")
        return v

    @field_validator("keys", "queries", "hops")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    @field_validator("min_length")
    @classmethod
    def _min_length(cls, v: int | None) -> int | None:
        if v is not None and v < 16:
            raise ValueError(f"must be at least 16 tokens (got {v})")
        return v

    @model_serializer(mode="wrap")
    def _drop_unset_options(self, handler: Any) -> Any:
        # Recorded only when set: runs and provenance written before they existed stay the same.
        out = handler(self)
        if isinstance(out, dict):
            if out.get("min_length") is None:
                out.pop("min_length", None)
            if not out.get("composed"):
                out.pop("composed", None)
        return out

    @model_validator(mode="after")
    def _queries_within_keys(self) -> TaskOptions:
        if self.queries > self.keys:
            raise ValueError(f"queries ({self.queries}) must not exceed keys ({self.keys})")
        return self


class MixSource(StrictModel):
    """One source of a data mix and its weight (a sample's chance is weight / sum of weights)."""

    source: str
    """stdlib, a text file, folder, .jsonl or dataset name (as ``data`` takes), or a task:
    retrieval, multikey or multihop."""
    weight: float
    """Relative weight (>= 0; the weights must sum to a positive number)."""

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("a mix source must not be empty")
        close = difflib.get_close_matches(v, TASK_SOURCES, n=1, cutoff=0.75)
        if close and v not in TASK_SOURCES and not Path(v).expanduser().exists():
            raise ValueError(
                f"unknown mix source {v!r}: did you mean the task {close[0]!r}? (tasks: "
                f"{', '.join(TASK_SOURCES)}; text: stdlib, a path or a dataset name)"
            )
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"mix weights must be finite numbers >= 0 (got {v})")
        return v

    @property
    def is_task(self) -> bool:
        return self.source in TASK_SOURCES


def _mix_items(v: Any) -> Any:
    """The mix as the CLI and recipes may write it: ["stdlib:0.6", "retrieval:0.4"] (the
    weight after the last colon), or a mapping {stdlib: 0.6, retrieval: 0.4}."""
    if isinstance(v, dict):
        return [{"source": k, "weight": w} for k, w in v.items()]
    if not isinstance(v, (list, tuple)):
        return v
    out = []
    for item in v:
        if isinstance(item, str):
            source, sep, weight = item.rpartition(":")
            try:
                value = float(weight)
            except ValueError:
                value = None
            if not sep or not source or value is None:
                raise ValueError(
                    f"mix items are SOURCE:WEIGHT, e.g. stdlib:0.6 or retrieval:0.4 (got {item!r})"
                )
            item = {"source": source, "weight": value}
        out.append(item)
    return out


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
    attn_implementation: AttnImplementation = None
    """None: per model, as for eval (ctxext.modeling.choose_attn_implementation)."""
    mix: tuple[MixSource, ...] | None = None
    """A seeded mixture of sources by weight, instead of ``data``: sample i of the run comes
    from a source drawn with probability weight / sum (a function of seed and i, so a resumed
    run draws the same). Text sources are read as ``data`` is (text_field, dataset_config,
    dataset_split, fallback_encoding apply to each), and only as far as their share needs;
    task sources (retrieval, multikey, multihop) are synthetic sequences built at the training
    length with filler text from the first text source (which may have weight 0)."""
    tasks: TaskOptions = TaskOptions()
    """Parameters of the task sources."""
    loss: Loss = "ce"
    """ce: cross-entropy. longce: LongCE (Fang et al. 2024), cross-entropy re-weighted per token
    by min(exp(NLL with a short context - NLL with the full context), 5)."""
    longce_window: int | None = None
    """longce: the short context W (the reference's trunc_len): a cut token reads its last W to
    W+S-1 positions (default: the model's trained length)."""
    longce_stride: int | None = None
    """longce: the short chunks' stride S (the reference's internal; default: W/4, its
    ratio)."""
    short_fraction: float = 0.0
    """Mixed context-window training (LongRoPE2): this share of the batches is packed as
    episodes no longer than the trained length (position ids from 0, attention within each),
    so a model extended with keep_short (longrope with short factors) trains its short mode,
    the trained frequencies, beside the rescaled one. 0: every batch at the training length."""

    @field_validator("mix", mode="before")
    @classmethod
    def _mix_written(cls, v: Any) -> Any:
        return _mix_items(v)

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

    @field_validator("longce_window", "longce_stride")
    @classmethod
    def _window(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    @model_validator(mode="after")
    def _mix_sources(self) -> FinetuneConfig:
        if self.tasks.min_length is not None and not any(m.is_task for m in self.mix or ()):
            raise PydanticCustomError(
                "mix",
                "applies to task sources and none is given: add one (e.g. --mix stdlib:0.7 "
                "--mix multikey:0.3) or drop --task-min-length",
                {"at": ("tasks", "min_length")},
            )
        if self.mix is None:
            return self
        problem = _mix_problem(self)
        if problem:
            raise PydanticCustomError("mix", problem, {"at": ("mix",)})
        return self

    @model_validator(mode="after")
    def _longce(self) -> FinetuneConfig:
        w, s = self.longce_window, self.longce_stride
        if self.loss != "longce" and (w is not None or s is not None):
            raise ValueError("longce_window and longce_stride apply only to loss longce")
        if self.loss == "longce" and self.tasks.min_length is not None:
            raise ValueError(
                "loss longce reads each sample as one text and task episodes (tasks.min_length) "
                "pack several: drop --task-min-length or use --loss ce"
            )
        if self.loss == "longce" and self.pose:
            raise ValueError(
                "loss longce reads each sample as contiguous text and PoSE samples are not: "
                "drop --pose or use --loss ce"
            )
        if self.short_fraction and (self.loss == "longce" or self.pose):
            raise ValueError(
                "short_fraction packs short episodes, which "
                + ("loss longce" if self.loss == "longce" else "PoSE position ids")
                + " cannot read: drop --short-fraction or "
                + ("use --loss ce" if self.loss == "longce" else "drop --pose")
            )
        if w is not None and s is not None and s > w:
            raise ValueError(f"longce_stride ({s}) must not exceed longce_window ({w})")
        return self

    @field_validator("short_fraction")
    @classmethod
    def _short_share(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(
                f"must be a share in [0, 1) (got {v}): at 1 the rescaled mode is never trained"
            )
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
        out = self.model_dump(mode="json", exclude=set(_RESUME_FREE))
        for key in _NEW_OPTIONS:
            if getattr(self, key) == type(self).model_fields[key].default:
                del out[key]
        return out

    def text_sources(self) -> list[str | None]:
        """The text sources read, the first one first (``[data]`` without a mix)."""
        if self.mix is None:
            return [self.data]
        return [m.source for m in self.mix if not m.is_task]


def _mix_problem(cfg: FinetuneConfig) -> str | None:
    """What is wrong with a data mix as a whole (None: nothing)."""
    mix = cfg.mix or ()
    if not mix:
        return "give at least one SOURCE:WEIGHT, e.g. stdlib:0.6 and retrieval:0.4"
    if cfg.data is not None:
        return "give the text sources in the mix (the first is the tasks' filler), not also data"
    if not sum(m.weight for m in mix) > 0:
        return "the mix weights sum to 0: give at least one source a positive weight"
    names = [m.source for m in mix]
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        return f"{repeated!r} is listed twice; give each source once with its total weight"
    tasks = [m.source for m in mix if m.is_task]
    if tasks and len(tasks) == len(mix):
        return (
            "the task sources need a text source for their filler: add one, e.g. stdlib:0 "
            "(weight 0: filler only)"
        )
    if tasks and cfg.pose:
        return (
            f"task sources ({', '.join(tasks)}) are built at the training length and PoSE "
            "windows would cut them: drop --pose or the task sources"
        )
    return None
