"""The `ctxext` command line: parses flags into typed configs and renders results.

No logic lives here beyond parsing and rendering; heavy libraries (torch, transformers) are
imported inside the commands so that `ctxext --help` is instant.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ctxext import __version__
from ctxext.errors import CtxextError

app = typer.Typer(
    name="ctxext",
    help="Extend the context window of pretrained RoPE language models.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelArg = Annotated[
    Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Argument(
        help="Model folder, Hub id, or 'stdlib-llama' (the bundled model, the default).",
        show_default=False,
    ),
]
MethodOpt = Annotated[
    str, typer.Option("--method", "-m", help="linear | ntk | yarn | dynamic | llama3")
]
FactorOpt = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option("--factor", "-f", help="Scale factor s = new length / trained length (> 1)."),
]
TargetOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option("--target-length", "-t", help="New context length (instead of --factor)."),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"ctxext {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Extend the context window of pretrained RoPE language models.

    Add --debug anywhere to see full tracebacks.
    """


def _extend_config(method: str, factor: float | None, target: int | None, **options: Any):
    from ctxext.config import ExtendConfig, parse_model

    data = {"method": method, "factor": factor, "target_length": target, **options}
    return parse_model(ExtendConfig, data, "extend options")


@app.command()
def extend(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = ...,  # type: ignore[assignment]
    method: MethodOpt = ...,  # type: ignore[assignment]
    factor: FactorOpt = None,
    target_length: TargetOpt = None,
    beta_fast: Annotated[float, typer.Option(help="YaRN beta_fast.")] = 32.0,
    beta_slow: Annotated[float, typer.Option(help="YaRN beta_slow.")] = 1.0,
    attention_factor: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="YaRN attention factor (default 0.1 ln s + 1)."),
    ] = None,
    low_freq_factor: Annotated[float, typer.Option(help="llama3 low_freq_factor.")] = 1.0,
    high_freq_factor: Annotated[float, typer.Option(help="llama3 high_freq_factor.")] = 4.0,
    copy: Annotated[bool, typer.Option("--copy", help="Copy weight files.")] = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="Symlink weight files.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the config diff; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a context-extended copy of MODEL (config-only: weights are linked, never loaded)."""
    from ctxext.config import ExtendJob
    from ctxext.extend import plan_extend, write_extended

    if copy and symlink:
        raise CtxextError("--copy and --symlink exclude each other; pick one")
    spec = _extend_config(
        method,
        factor,
        target_length,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        attention_factor=attention_factor,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
    )
    mode = "copy" if copy else "symlink" if symlink else "hardlink"
    job = ExtendJob(model=model, output=output, extend=spec, link_mode=mode, overwrite=overwrite)
    plan = plan_extend(job.model, job.extend)
    if dry_run:
        if as_json:
            out.print_json(data={"diff": [list(d) for d in plan.diff], "factor": plan.factor})
        else:
            _render_diff(plan)
            err.print("[dim]dry run: nothing written[/dim]")
        return
    record = write_extended(plan, job)
    if as_json:
        out.print_json(data=record)
        return
    _render_diff(plan)
    err.print(
        f"[green]wrote[/green] {job.output} ({spec.method}, x{plan.factor:g}: "
        f"{record['trained_length']} -> {plan.new_length} tokens) in {record['seconds']:.2f}s"
    )


def _render_diff(plan: Any) -> None:
    table = Table(title=f"{plan.source.name}: config changes", show_lines=False)
    table.add_column("key")
    table.add_column("before", style="red")
    table.add_column("after", style="green")
    for key, old, new in plan.diff:
        table.add_row(key, _short(old), _short(new))
    out.print(table)


def _short(value: Any) -> str:
    if value is None:
        return "-"
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) < 80 else text[:77] + "..."


@app.command()
def inspect(
    model: ModelArg = None,
    target_length: TargetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the positional scheme, rope parameters and a per-dimension-pair view."""
    from ctxext.inspect import inspect_model, render_inspect

    report = inspect_model(model, target_length)
    if as_json:
        out.print_json(data=report)
    else:
        render_inspect(report, out)


def _run_app(argv: list[str]) -> int:
    import click

    try:
        app(args=argv, prog_name="ctxext", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        err.print("interrupted", style="red")
        return 130
    except click.ClickException as e:
        _one_line(f"error: {e.format_message()} (see --help)")
        return 2


def _one_line(message: str) -> None:
    # Exactly one line: collapse newlines that library messages sometimes carry.
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 (1 for resource failures), 130 on Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CTXEXT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        code = _run_app(args)
    except CtxextError as e:
        if debug:
            raise
        _one_line(f"error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        _one_line("interrupted")
        code = 130
    except OSError as e:
        if debug:
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _one_line(f"error: no space left on the device ({e.filename or ''}); free space and retry")
        else:
            _one_line(f"error: {e.strerror or e} ({e.filename or ''}); add --debug for details")
        code = 1
    sys.exit(code)
