"""`ctxext extend`: flags -> :class:`ctxext.config.ExtendJob` -> a config-only extended copy.

Only typer and rich are imported at module level, so `ctxext --help` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli.options import (
    AllowPickleOpt,
    BetaFastOpt,
    BetaSlowOpt,
    FactorOpt,
    KeepShortOpt,
    ModelArg,
    OverwriteOpt,
    TargetOpt,
)
from ctxext.errors import CtxextError
from ctxext.rope.methods import ALL_METHODS, OPTION_DEFAULTS

_out = Console()
_err = Console(stderr=True)

MethodOpt = Annotated[str, typer.Option("--method", "-m", help=" | ".join(ALL_METHODS))]
FactorFileOpt = Optional[Path]  # noqa: UP045


def _extend_config(method: str, factor: float | None, target: int | None, **options: Any):
    from ctxext.config import ExtendConfig, parse_model

    data = {"method": method, "factor": factor, "target_length": target, **options}
    return parse_model(ExtendConfig, data, "extend options")


def extend(
    model: ModelArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = ...,  # type: ignore[assignment]
    method: MethodOpt = ...,  # type: ignore[assignment]
    factor: FactorOpt = None,
    target_length: TargetOpt = None,
    beta_fast: BetaFastOpt = OPTION_DEFAULTS["beta_fast"],
    beta_slow: BetaSlowOpt = OPTION_DEFAULTS["beta_slow"],
    attention_factor: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="YaRN attention factor (default 0.1 ln s + 1)."),
    ] = None,
    low_freq_factor: Annotated[
        float, typer.Option(help="llama3 low_freq_factor.")
    ] = OPTION_DEFAULTS["low_freq_factor"],
    high_freq_factor: Annotated[
        float, typer.Option(help="llama3 high_freq_factor.")
    ] = OPTION_DEFAULTS["high_freq_factor"],
    theta_multiplier: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="ntk: multiply rope_theta by this (default s^(d/(d-2)))."),
    ] = None,
    long_factor: Annotated[
        FactorFileOpt, typer.Option(help="longrope: file with rotary_dim/2 factors (JSON list).")
    ] = None,
    short_factor: Annotated[
        FactorFileOpt, typer.Option(help="longrope: factors up to the trained length (default 1).")
    ] = None,
    keep_short: KeepShortOpt = False,
    copy: Annotated[bool, typer.Option("--copy", help="Copy weight files.")] = False,
    allow_pickle: AllowPickleOpt = False,
    symlink: Annotated[bool, typer.Option("--symlink", help="Symlink weight files.")] = False,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the config diff; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a context-extended copy of MODEL (config-only: weights are linked, never loaded)."""
    from ctxext import outputs
    from ctxext.config import ExtendJob
    from ctxext.extend import plan_extend, write_extended

    if copy and symlink:
        raise CtxextError("--copy and --symlink exclude each other; pick one")
    factor_lists = {
        "long_factor": read_factor_file(long_factor, "--long-factor"),
        "short_factor": read_factor_file(short_factor, "--short-factor"),
    }
    spec = _extend_config(
        method,
        factor,
        target_length,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        attention_factor=attention_factor,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
        theta_multiplier=theta_multiplier,
        keep_short=keep_short,
        **factor_lists,
    )
    mode = "copy" if copy else "symlink" if symlink else "hardlink"
    job = ExtendJob(model=model, output=output, extend=spec, link_mode=mode, overwrite=overwrite)
    plan = plan_extend(job.model, job.extend)
    if dry_run:
        if as_json:
            _out.print_json(data={"diff": [list(d) for d in plan.diff], "factor": plan.factor})
        else:
            _render_diff(plan)
            _err.print("[dim]dry run: nothing written[/dim]")
        _warn(plan.notes)
        return
    with outputs.output_lock(job.output):
        record = write_extended(plan, job, allow_pickle=allow_pickle)
    _warn(plan.notes)
    if as_json:
        _out.print_json(data=record)
        return
    _render_diff(plan)
    kept = (
        f", as longrope: trained frequencies up to {record['trained_length']}" if keep_short else ""
    )
    _err.print(
        f"[green]wrote[/green] {job.output} ({spec.method}, x{plan.factor:g}: "
        f"{record['trained_length']} -> {plan.new_length} tokens{kept}) in "
        f"{record['seconds']:.2f}s"
    )


def _warn(notes: list[str]) -> None:
    for note in notes:  # on stderr, one line each, so also with --json
        _err.print(f"[yellow]warning:[/yellow] {note}", soft_wrap=True)


def _render_diff(plan: Any) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"{plan.source.name}: config changes", box=box.SIMPLE_HEAD)
    table.add_column("key", overflow="fold")
    table.add_column("before", style="red", overflow="fold")
    table.add_column("after", style="green", overflow="fold")
    for key, old, new in _diff_rows(plan.diff):
        table.add_row(key, _cell(old), _cell(new))
    _out.print(table)


def _diff_rows(diff: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """A block added or removed whole (e.g. the legacy rope_scaling mirror) as one row per key,
    so no cell holds a whole JSON object and the table stays readable at 80 columns."""
    rows = []
    for key, old, new in diff:
        if isinstance(old, dict) or isinstance(new, dict):
            before = old if isinstance(old, dict) else {}
            after = new if isinstance(new, dict) else {}
            inner = [(k, before.get(k), after.get(k)) for k in dict.fromkeys([*before, *after])]
            rows += _diff_rows([(f"{key}.{k}", o, n) for k, o, n in inner if o != n])
        else:
            rows.append((key, old, new))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, list) else str(value)


def read_factor_file(path: Path | None, what: str) -> list[float] | None:
    """A JSON list of numbers, or numbers separated by commas / whitespace."""
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CtxextError(f"{what} {path}: cannot read it ({e.strerror}); check the path") from None
    try:
        values = (
            json.loads(text) if text.lstrip().startswith("[") else text.replace(",", " ").split()
        )
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise CtxextError(
            f"{what} {path}: expected a JSON list of numbers or numbers separated by commas/spaces"
        ) from None
