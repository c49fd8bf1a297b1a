"""`ctxext run RECIPE` and `ctxext recipes list | show | validate`: parsing and rendering only.

The work is in :mod:`ctxext.recipes`; this module imports only typer, rich and pydantic at
import time, so `ctxext --help` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli.options import (
    AllowPickleOpt,
    ForceOpt,
    MemoryLimitOpt,
    OverwriteOpt,
    PlanOnlyOpt,
    RecalibrateOpt,
    TrustRemoteCodeOpt,
)

__all__ = ["recipes_app", "run"]

_out = Console()
_err = Console(stderr=True)

RecipeArg = Annotated[
    str,
    typer.Argument(
        help="A recipe .yaml file, or the name of a shipped recipe (see `ctxext recipes list`).",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    Optional[list[str]],  # noqa: UP045 (typer needs Optional on 3.10)
    typer.Argument(
        help="Overrides applied before validation, e.g. finetune.steps=10 "
        "eval.lengths=[256,512] seed=1 (values are YAML).",
        show_default=False,
    ),
]


def run(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    output_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--output-dir", "-o", help="Output folder (overrides the recipe's output_dir)."
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Validate and print the resolved recipe; run nothing."),
    ] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
    force: ForceOpt = False,
    memory_limit: MemoryLimitOpt = None,
    plan_only: PlanOnlyOpt = False,
    recalibrate: RecalibrateOpt = False,
) -> None:
    """Run a recipe: extend -> fine-tune -> eval, then results, plots, report and model card.

    The terminal ends with what to look at: per variant, the far-context gain at the longest
    length, retrieval per length and the effective context length.

    Writes output_dir atomically: recipe.yaml, model/ + README.md, results.json/.csv, plots, report.md.
    """
    from ctxext.recipes.loader import load_recipe
    from ctxext.recipes.runner import run_recipe

    loaded = load_recipe(recipe, overrides or [], output_dir=output_dir)
    out = loaded.output_dir()
    if dry_run:
        _print_resolved(loaded)
        _err.print(f"[dim]dry run: {loaded.recipe.summary()}; would write {out}[/dim]")
        return
    from ctxext import locate, outputs
    from ctxext.cli.guard import GuardOptions, check_recipe
    from ctxext.cli.progress import token_progress
    from ctxext.recipes.runner import preflight

    lock = outputs.output_lock(out) if not plan_only else contextlib.nullcontext()
    # One writer per output; then the memory/time check; a Hub revision resolved once for both.
    with lock, locate.one_commit_per_revision():
        preflight(loaded.recipe)  # what is cheap to check, before the resource check measures
        announce = check_recipe(
            loaded, GuardOptions(force, memory_limit, plan_only, as_json, recalibrate)
        )
        with token_progress(_err) as progress, _FinetuneBar(progress, enabled=not as_json) as bar:
            summary = run_recipe(
                loaded,
                overwrite=overwrite,
                hooks=_hooks(progress, bar, quiet=as_json, announce=announce),
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
            )
    if as_json:
        _out.print_json(data=_jsonable(summary))
        return
    _render(summary, loaded)


def _hooks(progress: Any, bar: _FinetuneBar, quiet: bool, announce: Any = None) -> Any:
    from ctxext.recipes.runner import RunHooks

    bar.announce = announce

    def status(message: str) -> None:
        if not quiet:
            progress.console.print(f"[bold cyan]>[/bold cyan] {message}", soft_wrap=True)

    def factory(what: str, total: int):
        if announce is not None:  # a long run's estimate, when the work starts
            announce.show(progress.console)
        task_id = progress.add_task(what, total=total)
        return lambda done: progress.update(task_id, completed=done)

    def warning(message: str) -> None:  # on stderr, also with --json
        progress.console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)

    return RunHooks(status=status, warning=warning, finetune=bar, eval_factory=factory)


class _FinetuneBar:
    """Tasks in the shared progress (bars, or lines in a log), driven by run_finetune's
    progress events: data packing (tokens), then the steps."""

    def __init__(self, progress: Any, enabled: bool) -> None:
        self.progress, self.enabled, self.task = progress, enabled, None
        self.packing: dict[str, Any] = {}  # source -> task id
        self.announce: Any = None

    def __enter__(self) -> _FinetuneBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event != "packing":
            self._packed()
        if event == "start" and self.announce is not None:
            self.announce.show(self.progress.console)
        if event == "packing":
            task = self.packing.get(info["source"])
            if task is None:
                task = self.progress.add_task(f"packing {info['source']}", total=info["total"])
                self.packing[info["source"]] = task
            self.progress.update(task, completed=info["done"])
        elif event == "start":
            self.task = self.progress.add_task(
                "finetune", total=info["total"], completed=info["completed"], unit="steps"
            )
        elif event == "step" and self.task is not None:
            self.progress.update(
                self.task,
                completed=info["step"],
                description=f"finetune loss {info['loss']:.3f}",
            )
        elif event == "warning":
            self.progress.console.print(
                f"[yellow]  warning:[/yellow] {info['message']}", soft_wrap=True
            )
        elif event in ("status", "checkpoint"):
            text = info.get("message") or f"checkpoint {info.get('path')}"
            self.progress.console.print(f"[dim]  {text}[/dim]", soft_wrap=True)

    def _packed(self) -> None:
        """Packing is over once another event comes: a source that ran out of text before
        the tokens wanted ends its bar where it stopped."""
        for task in self.packing.values():
            done = next(t.completed for t in self.progress.tasks if t.id == task)
            self.progress.update(task, total=done, completed=done)
        self.packing.clear()


def _render(summary: dict[str, Any], loaded: Any) -> None:
    from ctxext.report.tables import passkey_table, ppl_table
    from ctxext.text import plural

    results = summary.get("results")
    if results is not None:
        if "ppl" in results["config"]["tasks"]:
            _out.print(ppl_table(results))
        pk = passkey_table(results)
        if pk is not None:
            _out.print(pk)
    from rich.table import Table

    table = Table(title=f"ctxext run {loaded.name}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("output", summary["output_dir"])
    if summary.get("checkpoint"):
        table.add_row("checkpoint", f"{summary['checkpoint']} (model card: README.md)")
    ft = summary.get("finetune")
    if ft:
        loss = "-" if ft.get("final_loss") is None else f"{ft['final_loss']:.4f}"
        steps = plural(ft["steps"], "step")
        table.add_row("fine-tune", f"{steps}, final loss {loss}, {ft['seconds']:.0f}s")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary.get("timings", {}).items())
    table.add_row("time", f"{summary['seconds']:.1f}s ({timings})")
    table.add_row("seed", str(summary["provenance"]["seed"]))
    _out.print(table)
    if results is not None:  # last: what the README's headline is about, in 80 columns
        from ctxext.report.summary import headline_summary

        text = headline_summary(results)
        if text is not None:
            _out.print()
            _out.print(text, markup=False, highlight=False, soft_wrap=True)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _print_resolved(loaded: Any) -> None:
    import yaml

    _print_yaml(yaml.safe_dump(loaded.resolved(), sort_keys=False, allow_unicode=True))


def _print_yaml(text: str) -> None:
    """Highlighted on a terminal (long lines wrapped, none cut); the exact text otherwise.

    `ctxext recipes show NAME > my.yaml` must write the file unchanged, and a console that is
    not a terminal is 80 columns wide: Rich would cut every longer line there.
    """
    if not _out.is_terminal:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from rich.syntax import Syntax

    _out.print(Syntax(text, "yaml", background_color="default", word_wrap=True))


# --------------------------------------------------------------------------- recipes


recipes_app = typer.Typer(
    help="List, show and validate recipes (shipped ones are named without a path).",
    no_args_is_help=True,
    add_completion=False,
)


@recipes_app.command("list")
def list_recipes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The shipped recipes: name, model and what each one does."""
    from ctxext.recipes.loader import load_recipe, shipped_recipes

    rows = []
    for name in shipped_recipes():
        recipe = load_recipe(name).recipe
        rows.append(
            {
                "name": name,
                "model": recipe.model or "stdlib-llama",
                "does": recipe.summary(),
                "description": " ".join((recipe.description or "").split()),
            }
        )
    if as_json:
        _out.print_json(data=rows)
        return
    from rich.table import Table

    # Name over model in one column: at 80 columns "what it does" keeps room to wrap at
    # words; a long model id folds rather than being cut.
    table = Table(title="shipped recipes (`ctxext run NAME`)", show_lines=True)
    table.add_column("name / model", overflow="fold")
    table.add_column("what it does", overflow="fold")
    for row in rows:
        table.add_row(f"[bold]{row['name']}[/bold]\n{row['model']}", row["does"])
    _out.print(table)


@recipes_app.command("show")
def show(
    name: RecipeArg,
    overrides: OverridesArg = None,
    resolved: Annotated[
        bool,
        typer.Option(
            "--resolved", help="Show the validated recipe with every default (after overrides)."
        ),
    ] = False,
) -> None:
    """Print a recipe: the file as written (with its comments), or --resolved."""
    from ctxext.recipes.loader import find_recipe, load_recipe

    loaded = load_recipe(name, overrides or [])  # validates: an invalid recipe exits 2
    if resolved or overrides:
        _print_resolved(loaded)
        return
    path, _ = find_recipe(name)
    _print_yaml(path.read_text(encoding="utf-8"))


@recipes_app.command("validate")
def validate(
    file: RecipeArg,
    overrides: OverridesArg = None,
) -> None:
    """Check a recipe against the schema (keys, types, values); runs nothing.

    Exit code 0 when valid, else 2 with the file, key, line and what was expected.
    """
    from ctxext.recipes.loader import load_recipe

    loaded = load_recipe(file, overrides or [])
    _out.print(f"[green]valid[/green] {loaded.path}: {loaded.recipe.summary()}")
