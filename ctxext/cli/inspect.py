"""`ctxext inspect`: the positional scheme and rope parameters of a model (config only)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from ctxext.cli.options import ModelArg, TargetOpt

_out = Console()


def inspect(
    model: ModelArg = None,
    target_length: TargetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the positional scheme, rope parameters and a per-dimension-pair view."""
    from ctxext.inspect import inspect_model, render_inspect

    report = inspect_model(model, target_length)
    if as_json:
        _out.print_json(data=report)
    else:
        render_inspect(report, _out)
