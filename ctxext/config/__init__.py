"""Typed configuration: one schema for the CLI flags and for recipe files.

Each command builds one of these models from its flags; a recipe holds the same models
under its keys. Validation of values lives here (pydantic); validation against a particular
checkpoint (trained length, architecture) lives in :mod:`ctxext.rope`.

One module per command (:mod:`~ctxext.config.extend`, :mod:`~ctxext.config.eval`,
:mod:`~ctxext.config.finetune`, :mod:`~ctxext.config.tune`), what they share
(:mod:`~ctxext.config.base`) and the formatting of validation errors
(:mod:`~ctxext.config.errors`); the public names are re-exported here.
"""

from ctxext.config.base import (
    AttnImplementation,
    Dtype,
    StrictModel,
    fraction_list,
    known_encoding,
    length_word,
    positive_int_list,
)
from ctxext.config.errors import format_validation_error, keys_of, model_at, parse_model
from ctxext.config.eval import DocSelection, EvalConfig, Task
from ctxext.config.extend import ExtendConfig, ExtendJob, LinkMode, Method
from ctxext.config.finetune import (
    TASK_SOURCES,
    FinetuneConfig,
    Loss,
    LrSchedule,
    MixSource,
    TaskOptions,
    TrainablePart,
)
from ctxext.config.tune import TUNE_METHODS, TuneConfig

__all__ = [
    "TASK_SOURCES",
    "TUNE_METHODS",
    "AttnImplementation",
    "DocSelection",
    "Dtype",
    "EvalConfig",
    "ExtendConfig",
    "ExtendJob",
    "FinetuneConfig",
    "LinkMode",
    "Loss",
    "LrSchedule",
    "Method",
    "MixSource",
    "StrictModel",
    "Task",
    "TaskOptions",
    "TrainablePart",
    "TuneConfig",
    "format_validation_error",
    "fraction_list",
    "keys_of",
    "known_encoding",
    "length_word",
    "model_at",
    "parse_model",
    "positive_int_list",
]
