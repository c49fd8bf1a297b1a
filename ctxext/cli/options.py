"""Typer option types shared by several commands: one declaration, one help text; and the
config models' defaults, which the commands' options take as theirs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated, Any, Optional

import typer

from ctxext.rope.methods import KEEP_SHORT_METHODS


def field_defaults(model: Any) -> SimpleNamespace:
    """The default of every optional field of a config model (:mod:`ctxext.config`), by name.

    The commands take their option defaults from here, so that a flag left out means what the
    same key left out of a recipe means, and a default is stated once, in the model.
    """
    return SimpleNamespace(
        **{
            name: field.get_default(call_default_factory=True)
            for name, field in model.model_fields.items()
            if not field.is_required()
        }
    )


ModelArg = Annotated[
    Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Argument(
        help="Model folder, Hub id, or 'stdlib-llama' (the bundled model, the default).",
        show_default=False,
    ),
]
FactorOpt = Annotated[
    Optional[float],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Option("--factor", "-f", help="Scale factor s = new length / trained length (> 1)."),
]
TargetOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--target-length", "-t", help="New context length (instead of --factor)."),
]
BetaFastOpt = Annotated[float, typer.Option(help="YaRN beta_fast.")]
BetaSlowOpt = Annotated[float, typer.Option(help="YaRN beta_slow.")]
KeepShortOpt = Annotated[
    bool,
    typer.Option(
        "--keep-short",
        help=f"{'/'.join(KEEP_SHORT_METHODS)} written as longrope factors used past the trained "
        "length only: up to it, the trained frequencies.",
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow (and run) code from the model folder."),
]
AllowPickleOpt = Annotated[
    bool, typer.Option("--allow-pickle", help="Allow pickled (*.bin, *.pt) weights.")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output folder.")
]
DatasetConfigOpt = Annotated[
    Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Option(help="Config (subset) of a dataset, e.g. wikitext-103-raw-v1."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Run even if the memory estimate exceeds the limit.")
]
MemoryLimitOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="Memory budget for the pre-run check, e.g. 20GB (default: available RAM or GPU "
        "memory; also $CTXEXT_MEMORY_LIMIT).",
        show_default=False,
    ),
]
PlanOnlyOpt = Annotated[bool, typer.Option("--plan-only", hidden=True)]
RecalibrateOpt = Annotated[
    bool,
    typer.Option(
        "--recalibrate",
        help="Measure this machine's speeds and memory again for the pre-run check (~30 s) "
        "instead of using the cached calibration.",
    ),
]
AttnImplementationOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        help="eager | sdpa | flash_attention_2 (default: per model: flash-attention-2 on CUDA "
        "where installed and supported, else sdpa where exact, else eager).",
        show_default=False,
    ),
]
