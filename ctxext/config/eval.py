"""`ctxext eval`: what to measure, on which data, at which lengths."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import (
    field_validator,
    model_validator,
)

from ctxext.config.base import (
    AttnImplementation,
    Dtype,
    StrictModel,
    comma_list,
    each_one_of,
    known_encoding,
    length_word,
)
from ctxext.errors import CtxextError

Task = Literal["ppl", "passkey", "context-use", "retrieval", "longppl"]
TASKS: tuple[str, ...] = get_args(Task)
DocSelection = Literal["same", "per-length"]
#: The effective-length rule's floor (``--effective-threshold``): a retrieval family counts
#: only where the unscaled model retrieves at least this much of it at its trained length.
EFFECTIVE_FLOOR = 0.5


class EvalConfig(StrictModel):
    """`ctxext eval`: what to measure, on which data, at which lengths."""

    lengths: list[int]
    """Context lengths in tokens (positive integers)."""
    tasks: list[Task] = ["ppl"]  # noqa: RUF012 (pydantic copies defaults)
    """ppl (perplexity and loss by position), passkey (natural-language retrieval),
    context-use (far-context gain), retrieval (key retrieval with a per-model template) and/or
    longppl (LongPPL: the key tokens' perplexity, Fang et al. 2024; its own short pass)."""
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
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]  # noqa: RUF012
    """Passkey depths, as fractions of the filler placed before the key."""
    passkey_trials: int = 5
    """Random keys per length x depth (passkey and retrieval)."""
    local_window: int | None = None
    """context-use: positions of a local window, BOS + the last local_window-1 tokens, as the
    full pass starts with BOS; longppl: the short context W (the reference's trunc_len), a cut
    token reads its last W to W+S-1 positions (default: the trained length of each model)."""
    local_stride: int | None = None
    """context-use: stride of the local windows (default: local_window // 4; 1 is exact);
    longppl: stride S of the short chunks of W+S positions (the reference's sliding_window;
    default: local_window // 4, the reference's ratio)."""
    retrieval_template: str = "auto"
    """retrieval: the key/value templates (ctxext.evaluate.needles) hidden in the evaluation documents:
    heldout (the forms no ctxext training uses), train, all, or comma-separated template names;
    text (the natural-language passkey in its own filler); auto = heldout."""
    effective_threshold: float = EFFECTIVE_FLOOR
    """Floor of the effective-length rule, in (0, 1]: a retrieval family is judged only where
    the unscaled model retrieves at least this share of it at its trained length, and its
    threshold is max(floor, 0.9 x that share) (ctxext.evaluate.effective_length)."""
    reference_model: str | None = None
    """The model whose unscaled retrieval at its trained length judges every row's effective
    length (a folder, Hub id or stdlib-llama), e.g. the base model of a fine-tuned checkpoint
    evaluated alone. None: each row's own model, with the rope it was trained with (in a
    recipe: the recipe's base model)."""
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

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, v: Any) -> Any:
        # --task ppl,retrieval as --lengths 256,512 (and repeated: --task ppl --task retrieval);
        # names whatever their case (PPL is ppl); a near miss gets "did you mean".
        return each_one_of(comma_list(v), TASKS, "task")

    @field_validator("lengths", mode="before")
    @classmethod
    def _length_words(cls, v: Any) -> Any:
        # A recipe may write lengths as the CLI takes them: [1k, 2k] or "256,512,1k".
        items = comma_list(v)
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

    @field_validator("effective_threshold")
    @classmethod
    def _floor(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:  # NaN fails too
            raise ValueError(f"must be a fraction in (0, 1], e.g. 0.5 (got {v})")
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
            from ctxext.evaluate.needles import resolve_templates

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
