"""Typed configuration: one schema for the CLI flags and for recipe files.

Each command builds one of these models from its flags; a recipe holds the same models
under its keys. Validation of values lives here (pydantic); validation against a particular
checkpoint (trained length, architecture) lives in :mod:`ctxext.rope`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ctxext.data import DEFAULT_SHUFFLE_BUFFER
from ctxext.errors import CtxextError
from ctxext.rope.methods import ALL_METHODS, FACTOR_LIST_METHODS, OPTION_DEFAULTS
from ctxext.text import plural

Method = Literal[ALL_METHODS]  # type: ignore[valid-type]  # the names defined in ctxext.rope
LinkMode = Literal["hardlink", "copy", "symlink"]
Task = Literal["ppl", "passkey", "context-use", "retrieval"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"] | None
DocSelection = Literal["same", "per-length"]


def known_encoding(v: str | None) -> str | None:
    """A codec name Python knows (validator shared by the eval and finetune configs)."""
    import codecs

    if v is not None:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r} (try latin-1 or cp1252)") from None
    return v


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable.

    Field docstrings document the fields in the source (and in recipe files); pydantic is not
    asked to extract them (``use_attribute_docstrings`` parses each class's source at import,
    which every `ctxext` start-up would pay). Schemas are built on first use (``defer_build``),
    so a command validates only the models it needs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class ExtendConfig(StrictModel):
    """How to rewrite the rotary configuration."""

    method: Method
    """Scaling method: linear (position interpolation), ntk (NTK-aware base change), yarn,
    dynamic (dynamic NTK), llama3 (Llama-3.1-style) or longrope (per-pair factors)."""
    factor: float | None = None
    """Scale factor s = new context length / trained length (> 1)."""
    target_length: int | None = None
    """New context length in tokens; the factor is derived from it. Give factor or this."""
    beta_fast: float = OPTION_DEFAULTS["beta_fast"]
    """YaRN: pairs turning more than beta_fast times within the trained length are kept."""
    beta_slow: float = OPTION_DEFAULTS["beta_slow"]
    """YaRN: pairs turning fewer than beta_slow times are fully interpolated."""
    attention_factor: float | None = OPTION_DEFAULTS["attention_factor"]
    """YaRN and longrope: scale of cos/sin (softmax temperature); default 0.1 ln(s) + 1 (YaRN),
    sqrt(1 + ln s / ln L) (longrope; vLLM reads only this default)."""
    low_freq_factor: float = OPTION_DEFAULTS["low_freq_factor"]
    """llama3: wavelengths above trained_length / low_freq_factor are divided by s."""
    high_freq_factor: float = OPTION_DEFAULTS["high_freq_factor"]
    """llama3: wavelengths below trained_length / high_freq_factor are kept."""
    theta_multiplier: float | None = OPTION_DEFAULTS["theta_multiplier"]
    """ntk: rope_theta is multiplied by this; default s ** (d / (d - 2)) (bloc97's rule)."""
    long_factor: list[float] | None = OPTION_DEFAULTS["long_factor"]
    """longrope: rotary_dim/2 divisors of the pair frequencies, used past the trained length."""
    short_factor: list[float] | None = OPTION_DEFAULTS["short_factor"]
    """longrope: the divisors used up to the trained length; default all 1 (unchanged)."""

    @field_validator("factor")
    @classmethod
    def _factor(cls, v: float | None) -> float | None:
        if v is not None and (not math.isfinite(v) or v <= 1):
            raise ValueError(f"factor must be a finite number > 1 (got {v})")
        return v

    @field_validator("target_length")
    @classmethod
    def _target(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"target_length must be a positive integer (got {v})")
        return v

    @field_validator("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"must be a finite number > 0 (got {v})")
        return v

    @field_validator("theta_multiplier")
    @classmethod
    def _positive_or_none(cls, v: float | None) -> float | None:
        return None if v is None else cls._positive(v)

    @field_validator("long_factor", "short_factor")
    @classmethod
    def _factors(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not math.isfinite(x) or x <= 0 for x in v)):
            raise ValueError("must be a non-empty list of finite numbers > 0")
        return v

    @model_validator(mode="after")
    def _one_of(self) -> ExtendConfig:
        if (self.factor is None) == (self.target_length is None):
            raise ValueError("give exactly one of factor and target_length")
        if self.beta_fast <= self.beta_slow:
            raise ValueError("beta_fast must be greater than beta_slow")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("high_freq_factor must be greater than low_freq_factor")
        if self.method == "longrope" and self.long_factor is None:
            raise ValueError(
                "method longrope needs long_factor (--long-factor FILE with rotary_dim/2 "
                "numbers), or let `ctxext tune` search them"
            )
        if self.long_factor is not None and self.method != "longrope":
            raise ValueError("long_factor applies only to method longrope")
        if self.short_factor is not None and self.method != "longrope":
            raise ValueError("short_factor applies only to method longrope")
        if self.theta_multiplier is not None and self.method != "ntk":
            raise ValueError("theta_multiplier applies only to method ntk")
        return self

    def rope_options(self) -> dict:
        """The method-specific keyword arguments of :func:`ctxext.rope.extend_config`."""
        return self.model_dump(exclude={"method", "factor", "target_length"})


class ExtendJob(StrictModel):
    """`ctxext extend`: config-only extension of one checkpoint."""

    model: str | None = None
    """Model folder, Hub id or bundled short name (default: the bundled model)."""
    output: Path
    """Output folder (created atomically)."""
    extend: ExtendConfig
    link_mode: LinkMode = "hardlink"
    """How weight files reach the output: hardlink (copy where impossible), copy or symlink."""
    overwrite: bool = False
    """Replace an existing output folder."""


class EvalConfig(StrictModel):
    """`ctxext eval`: what to measure, on which data, at which lengths."""

    lengths: list[int]
    """Context lengths in tokens (positive integers)."""
    tasks: list[Task] = ["ppl"]
    """ppl (perplexity and loss by position), passkey (natural-language retrieval),
    context-use (far-context gain) and/or retrieval (key retrieval with a per-model template)."""
    data: str | None = None
    """Text file, folder, .jsonl, Hugging Face dataset name, or None for the default corpus
    (the bundled model's held-out stdlib files)."""
    text_field: str = "text"
    """Field holding the text in .jsonl files and datasets."""
    dataset_config: str | None = None
    """Config (subset) of a Hugging Face dataset, e.g. wikitext-103-raw-v1."""
    dataset_split: str | None = None
    """Split of a Hugging Face dataset; None reads test, else validation."""
    fallback_encoding: str | None = None
    """Encoding for data files that are not UTF-8 (e.g. latin-1); None refuses them."""
    stride: int | None = None
    """Sliding-window stride; None scores each document's first L tokens (YaRN protocol)."""
    num_docs: int | None = None
    """At most this many documents (a seeded sample when capped): the same ones at every length
    under doc_selection 'same'."""
    doc_selection: DocSelection = "same"
    """same: the documents long enough for the longest length are scored at every length (YaRN
    protocol; a sweep changes nothing but the length). per-length: each length scores every
    document long enough for it (more documents at short lengths, different sets)."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Passkey depths, as fractions of the filler placed before the key."""
    passkey_trials: int = 5
    """Random keys per length x depth (passkey and retrieval)."""
    local_window: int | None = None
    """context-use: positions of a local window, BOS + the last local_window-1 tokens, as the
    full pass starts with BOS (default: the trained length of each model)."""
    local_stride: int | None = None
    """context-use: stride of the local windows (default: local_window // 4; 1 is exact)."""
    retrieval_template: str = "auto"
    """retrieval: the key/value templates (ctxext.needles) hidden in the evaluation documents:
    heldout (the forms no ctxext training uses), train, all, or comma-separated template names;
    text (the natural-language passkey in its own filler); auto = heldout."""
    include_base: bool = True
    """Also evaluate each model unscaled when scaling methods are given."""
    dtype: Dtype = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    attn_implementation: AttnImplementation = None
    """None: per model (flash-attention-2 on CUDA where installed and supported, else sdpa
    where exact, else eager); see ctxext.modeling.choose_attn_implementation."""
    device_map: str | None = None
    """Passed to from_pretrained (e.g. 'auto' to spread a large model with accelerate)."""
    seed: int = 0
    """Seed for document sampling, bootstrap and passkeys."""

    @field_validator("lengths", mode="before")
    @classmethod
    def _length_words(cls, v: Any) -> Any:
        # A recipe may write lengths as the CLI takes them: [1k, 2k] or "256,512,1k".
        items = v.split(",") if isinstance(v, str) else v
        if not isinstance(items, list):
            return v
        return [length_word(x) or x if isinstance(x, str) else x for x in items]

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n < 2 for n in v):
            raise ValueError("lengths must be integers >= 2")
        return sorted(set(v))

    @field_validator("num_docs", "stride", "passkey_trials", "local_window", "local_stride")
    @classmethod
    def _positive_int(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be a positive integer (got {v})")
        return v

    _encoding = field_validator("fallback_encoding")(known_encoding)

    @model_validator(mode="after")
    def _local(self) -> EvalConfig:
        w, s = self.local_window, self.local_stride
        if w is not None and s is not None and s > w:
            raise ValueError(f"local_stride ({s}) must not exceed local_window ({w})")
        return self

    @property
    def template(self) -> str:
        """The retrieval template in force (auto resolved against the data)."""
        return "heldout" if self.retrieval_template == "auto" else self.retrieval_template

    @field_validator("retrieval_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v not in ("auto", "text"):
            from ctxext.needles import resolve_templates

            try:
                resolve_templates(v)
            except CtxextError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("passkey_depths")
    @classmethod
    def _depths(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 <= d <= 1.0 for d in v):
            raise ValueError("depths must be fractions between 0 and 1")
        return v


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
_NEW_OPTIONS = ("mix", "tasks", "loss", "longce_window", "longce_stride")


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
    def _drop_unset_min_length(self, handler: Any) -> Any:
        # Recorded only when set: runs and provenance written before it existed stay the same.
        out = handler(self)
        if isinstance(out, dict) and out.get("min_length") is None:
            out.pop("min_length", None)
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
    by min(exp(NLL with the last longce_window tokens - NLL with the full context), 5)."""
    longce_window: int | None = None
    """longce: tokens of context of the short pass (default: the model's trained length)."""
    longce_stride: int | None = None
    """longce: stride of the short pass's windows (default: half the window)."""

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
        if w is not None and s is not None and s > w:
            raise ValueError(f"longce_stride ({s}) must not exceed longce_window ({w})")
        return self

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


#: What `ctxext tune` searches unless told, in this order (a search's seeded draws follow it):
#: every method but dynamic, which rescales at run time and has nothing to tune.
TUNE_METHODS: tuple[str, ...] = ("yarn", "ntk", "linear", "llama3", *FACTOR_LIST_METHODS)


class TuneConfig(StrictModel):
    """`ctxext tune`: what to search, on which data, with which budget."""

    model: str | None = None
    target_length: int
    methods: list[str] = Field(default_factory=lambda: list(TUNE_METHODS))
    """Methods to search (see TUNE_METHODS)."""
    budget_minutes: float = 15.0
    """Wall-clock budget of the search (the report afterwards is extra)."""
    budget_evals: int | None = None
    """Budget in document forwards at the target length; overrides budget_minutes and makes a
    search machine-independent (tune.json records the one used)."""
    search_docs: int = 8
    report_docs: int = 16
    guard: float = 0.05
    """Reject candidates whose perplexity at the trained length exceeds the unscaled model's by
    more than this fraction."""
    report_lengths: list[int] | None = None
    """Leaderboard lengths (default: the trained length and the target length)."""
    data: str | None = None
    seed: int = 0


def parse_model(cls: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` into ``cls``; a failure becomes one CtxextError line naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtxextError(format_validation_error(e, where, cls)) from None


def format_validation_error(
    e: ValidationError,
    where: str,
    cls: type[BaseModel] | None = None,
    position: Callable[[tuple[Any, ...]], str] | None = None,
) -> str:
    """``WHERE: key.sub<position>: problem`` for the first problem, and how many more.

    The one formatter for flags and recipe files alike. ``cls`` (the validated model) lets an
    unknown key list the valid ones; ``position(loc)`` may add where the key was written,
    e.g. `` (line 12)``.
    """
    errors = e.errors()
    err = errors[0]
    # ctx["at"]: a model validator may point at the key its problem is about.
    loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {plural(len(errors) - 1, 'more problem')})" if len(errors) > 1 else ""
    written = position(loc) if position is not None else ""
    return f"{where}: {key}{written}: {_problem(err, loc, cls)}{more}"


def _problem(err: Any, loc: tuple[Any, ...], cls: type[BaseModel] | None) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = model_at(cls, loc[:-1]) if cls is not None else None
        return f"unknown key; expected one of: {keys_of(parent)}" if parent else "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        got = _short_repr(err.get("input"))
        return f"expected {msg.removeprefix('Input should be ')} (got {got})"
    return msg


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` in ``cls`` (None if none)."""
    for part in loc:
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        nested = _model_in(info.annotation)
        if nested is None:
            return None
        cls = nested
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def keys_of(cls: type[BaseModel]) -> str:
    """The keys ``cls`` accepts, comma-separated."""
    return ", ".join(cls.model_fields)


def length_word(item: str) -> int:
    """'512' -> 512, '1k' / '2K' -> 1024 / 2048 (k = 1024); 0 when it is not one."""
    item = item.strip().lower()
    try:
        return int(item.removesuffix("k")) * (1024 if item.endswith("k") else 1)
    except ValueError:
        return 0


def positive_int_list(text: str, what: str = "--lengths") -> list[int]:
    """Parse '256,512,1k,2K' into positive ints (k = 1024)."""
    out = []
    for item in text.split(","):
        value = length_word(item)
        if value <= 0:
            raise CtxextError(
                f"{what} must be positive integers separated by commas (got '{item.strip()}'), "
                "e.g. 256,512,1024"
            )
        out.append(value)
    return out


__all__ = [
    "TASK_SOURCES",
    "TUNE_METHODS",
    "EvalConfig",
    "ExtendConfig",
    "ExtendJob",
    "FinetuneConfig",
    "MixSource",
    "TaskOptions",
    "TuneConfig",
    "format_validation_error",
    "keys_of",
    "length_word",
    "model_at",
    "parse_model",
    "positive_int_list",
]
