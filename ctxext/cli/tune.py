"""`ctxext tune`: flags -> :class:`ctxext.config.TuneConfig` -> search -> output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli.options import ModelArg, field_defaults
from ctxext.config import TuneConfig

_out = Console()
_err = Console(stderr=True)
_DEFAULT = field_defaults(TuneConfig)
_METHODS = ",".join(_DEFAULT.methods)


def tune(
    model: ModelArg = None,
    target_length: Annotated[
        int, typer.Option("--target-length", "-t", help="Context length to tune for.")
    ] = ...,  # type: ignore[assignment]
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = ...,  # type: ignore[assignment]
    methods: Annotated[str, typer.Option(help=f"Comma-separated: {_METHODS}.")] = _METHODS,
    budget_minutes: Annotated[
        float, typer.Option(help="Search budget (wall clock).")
    ] = _DEFAULT.budget_minutes,
    budget_evals: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Budget in document forwards at the target (replays exactly)."),
    ] = _DEFAULT.budget_evals,
    search_docs: Annotated[
        int, typer.Option(help="Documents the search scores on.")
    ] = _DEFAULT.search_docs,
    report_docs: Annotated[
        int, typer.Option(help="Other documents for the leaderboard.")
    ] = _DEFAULT.report_docs,
    guard: Annotated[
        float, typer.Option(help="Max perplexity cost at the trained length (0.05 = 5%).")
    ] = _DEFAULT.guard,
    report_lengths: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Leaderboard lengths, e.g. 256,1k,2k (default: trained and target)."),
    ] = None,
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Text file, folder, .jsonl, or dataset name (default: held-out stdlib)."),
    ] = _DEFAULT.data,
    seed: Annotated[
        int, typer.Option(help="Seed for the document split and the search.")
    ] = _DEFAULT.seed,
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy weight files (default: link).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print tune.json to stdout.")] = False,
) -> None:
    """Search every method's hyperparameters (and LongRoPE factors) on held-out perplexity."""
    from ctxext.config import parse_model, positive_int_list
    from ctxext.tune.run import prepare

    cfg = parse_model(
        TuneConfig,
        {
            "model": model,
            "target_length": target_length,
            "methods": [m.strip() for m in methods.split(",") if m.strip()],
            "budget_minutes": budget_minutes,
            "budget_evals": budget_evals,
            "search_docs": search_docs,
            "report_docs": report_docs,
            "guard": guard,
            "report_lengths": positive_int_list(report_lengths, "--report-lengths")
            if report_lengths
            else None,
            "data": data,
            "seed": seed,
        },
        "tune options",
    )
    prepared = prepare(cfg, output, overwrite)  # every cheap check before the model loads
    result = _search_with_progress(cfg, prepared)
    from ctxext.tune.run import write_tune_output

    write_tune_output(result, prepared, "copy" if copy else "hardlink")
    if as_json:
        _out.print_json(json.dumps(result, allow_nan=True))
        return
    _render(result)
    _err.print(
        f"[green]wrote[/green] {prepared.output} (checkpoint, tune.json, recipe.yaml, leaderboard)"
    )


def _search_with_progress(cfg: Any, prepared: Any) -> dict[str, Any]:
    from ctxext.cli.progress import search_progress
    from ctxext.tune.run import run_tune

    with search_progress(_err) as progress:
        task = progress.add_task("tune: calibrating", total=None, best="")

        def update(spent: float, best: str) -> None:  # a bar, or a line a while in a log
            progress.update(task, description="tune", completed=spent, best=best)

        def on_budget(total: int) -> None:
            progress.update(task, total=total)

        return run_tune(cfg, prepared, update, on_budget)


def _render(result: dict[str, Any]) -> None:
    from rich.table import Table

    n, trained = result["config"]["target_length"], result["model"]["trained_length"]
    table = Table(
        title=f"leaderboard on {len(result['data']['report_documents'])} report documents "
        f"(unseen by the search), {result['protocol']['ppl']} protocol",
        caption=f"chosen: {result['chosen']['method']}; search {result['timing']['search_seconds']}"
        f" s, {len(result['candidates'])} candidates",
    )
    for col in ("rank", "configuration", f"ppl @ {trained}", f"ppl @ {n}", "vs paper YaRN"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for i, row in enumerate(result["leaderboard"], 1):
        table.add_row(
            str(i),
            row["label"],
            f"{row['ppl_trained']:.2f}",
            f"{row['ppl_target']:.2f}",
            f"{row['vs_paper_yarn']:+.1%}",
        )
    _out.print(table)
