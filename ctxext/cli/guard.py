"""The memory/time check every eval, finetune and run makes first, and its rendering.

Before a command loads weights, its workloads are estimated on this machine
(:mod:`ctxext.resources.guard`): the estimate is printed when the run will take more than a
minute, and a run whose peak exceeds the memory available (``--memory-limit``,
``$CTXEXT_MEMORY_LIMIT``, else free RAM or free GPU memory) is refused with one line naming the
cheapest changes that would fit, unless ``--force``. With the hidden ``--plan-only`` flag (what
`ctxext plan COMMAND ...` passes, see :mod:`ctxext.cli.app`) the command prints the estimate
instead and stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console

from ctxext.errors import CtxextError

__all__ = [
    "Announcement",
    "GuardOptions",
    "check_eval",
    "check_finetune",
    "check_recipe",
]

_out = Console()
_err = Console(stderr=True)


@dataclass(frozen=True)
class GuardOptions:
    """The flags every guarded command shares."""

    force: bool = False
    memory_limit: str | None = None
    plan_only: bool = False
    as_json: bool = False
    recalibrate: bool = False


@dataclass
class Announcement:
    """The estimate of a long run, printed once, when the work starts (after every cheap check
    and the model load, so that a bad input still fails with its one line)."""

    table: Any = None

    def show(self, console: Any) -> None:
        if self.table is not None:
            console.print(self.table)
            self.table = None


# --------------------------------------------------------------------------- the checks


def check_finetune(
    model: str | None, output: Any, extend: Any, cfg: Any, opts: GuardOptions
) -> Announcement:
    """Before `finetune` loads anything: its workload against this machine."""
    from ctxext.resources.guard import finetune_workloads

    return _decide(finetune_workloads(model, output, extend, cfg), opts)


def check_recipe(loaded: Any, opts: GuardOptions) -> Announcement:
    """Before `run` does anything slow: its fine-tune and eval phases against this machine."""
    from ctxext.resources.guard import recipe_workloads

    run = recipe_workloads(loaded)
    return _decide(run, opts) if run.phases else Announcement()


def check_eval(
    models: list[str | None],
    cfg: Any,
    opts: GuardOptions,
    variants_per_model: int,
    announce: Announcement,
) -> Callable[[dict[str | None, Any], dict[str, Any]], None]:
    """The check `run_eval` makes once the data is tokenized (the token counts give the time),
    before any model is loaded; a long run's estimate goes to ``announce``. ``sources``: the
    models as `run_eval` resolved them (not resolved again)."""

    def preflight(sources: dict[str | None, Any], token_cache: dict[str, Any]) -> None:
        from ctxext.resources.guard import eval_tokens, eval_workloads

        resolved = [sources[m] for m in models]
        tokens = eval_tokens(resolved, cfg, token_cache, variants_per_model)
        announce.table = _decide(eval_workloads(resolved, cfg, tokens), opts).table

    return preflight


def _decide(run: Any, opts: GuardOptions) -> Announcement:
    """Print the plan (plan-only), refuse an over-budget run, or announce a long one."""
    from ctxext.resources.guard import assess

    verdict = assess(
        run, opts.memory_limit, opts.plan_only, status=_err.status, recalibrate=opts.recalibrate
    )
    if opts.plan_only:
        _print_plan(verdict, opts.as_json)
        raise typer.Exit(0)
    refusal = verdict.refusal()
    if refusal is not None:
        if not opts.force:
            raise CtxextError(refusal)
        _err.print(f"[yellow]warning:[/yellow] {refusal} (--force: running anyway)", soft_wrap=True)
    return Announcement(_table(verdict)) if verdict.long else Announcement()


# --------------------------------------------------------------------------- rendering


def _print_plan(verdict: Any, as_json: bool) -> None:
    from ctxext.resources.estimate import format_bytes

    run, rows, limit, where, peak = (
        verdict.run, verdict.rows, verdict.limit, verdict.where, verdict.peak
    )  # fmt: skip
    if as_json:
        load = _machine_now()
        _out.print_json(
            data={
                "command": run.command,
                "model": run.model,
                "device": verdict.calib.device,
                "phases": [{"label": label, **e.to_dict()} for label, e in rows],
                "peak": peak,
                "seconds": verdict.seconds,
                "limit": limit,
                "limit_source": where,
                "fits": peak <= limit,
                "calibration_load": verdict.calib.load,
                "load": None
                if load is None
                else {"average": load.average, "cores": load.cores, "slowdown": load.slowdown},
            }
        )
        return
    fits = "fits" if peak <= limit else "does not fit"
    _out.print(_table(verdict))
    _out.print(f"peak {format_bytes(peak)}: {fits} in {format_bytes(limit)} ({where})")


def _table(verdict: Any) -> Any:
    """Components down, phases (lengths) across; as many tables as the terminal's width needs
    (each with the components), so no cell is cut at 80 columns."""
    from ctxext.resources.estimate import format_bytes

    run, rows, calib, limit, where = (
        verdict.run, verdict.rows, verdict.calib, verdict.limit, verdict.where
    )  # fmt: skip
    e0 = rows[0][1]
    training = e0.params_trainable > 0
    notes = [
        "peak = runtime + weights + optimizer + max(gradients, activations + attention + loss); "
        f"limit {format_bytes(limit)} ({where}); runtime: Python, torch and libraries"
    ]
    body: list[tuple[str, list[str]]] = [
        ("parameters", [f"{e.params_total:,}" for _, e in rows]),
        ("trainable", [f"{e.params_trainable:,}" for _, e in rows]),
        ("runtime", [format_bytes(e.runtime) for _, e in rows]),
        ("weights", [format_bytes(e.weights) for _, e in rows]),
    ]
    works = [w for _, w in run.phases]
    if training:
        body += [
            ("optimizer", [format_bytes(e.optimizer) for _, e in rows]),
            ("gradients", [format_bytes(e.gradients) for _, e in rows]),
        ]
        for name, ckpt in (("activ. ckpt", True), ("activ. no ckpt", False)):
            cells = []
            for (_, e), w in zip(rows, works, strict=True):
                value = e.activations if w.grad_ckpt == ckpt else e.activations_other
                cells.append(f"{format_bytes(value)}{'*' if w.grad_ckpt == ckpt else ''}")
            body.append((name, cells))
        notes.append("activ.: activations with or without gradient checkpointing (*: in force)")
    else:
        body.append(("activations", [format_bytes(e.activations) for _, e in rows]))
    body += [
        ("attention", [format_bytes(e.attention) for _, e in rows]),
        ("loss (logits)", [format_bytes(e.loss) for _, e in rows]),
        ("[bold]peak[/bold]", [f"[bold]{format_bytes(e.peak)}[/bold]" for _, e in rows]),
        (
            "time per step" if training else "time per forward",
            [_duration(e.seconds_per_step) for _, e in rows],
        ),
        ("time per token", [f"{e.seconds_per_token * 1e3:.3g} ms" for _, e in rows]),
        ("time", [_duration(e.seconds) if e.seconds is not None else "unknown" for _, e in rows]),
    ]
    total = verdict.seconds
    if total is None:
        notes.append(
            "unknown: an eval's time depends on its documents, which are not read before the "
            "run (give eval.num_docs, or --num-docs, for an estimate)"
        )
    title = f"ctxext plan {run.command}: {run.model} on {calib.device}"
    return _PlanTable(
        title,
        [label for label, _ in rows],
        body,
        ("total time", "unknown" if total is None else _duration(total)),
        [*notes, *_load_lines(verdict)],
    )


class _PlanTable:
    """The plan as Rich tables: the phases split over as many tables as the width needs."""

    def __init__(
        self,
        title: str,
        phases: list[str],
        body: list[tuple[str, list[str]]],
        total: tuple[str, str],
        notes: list[str],
    ) -> None:
        self.title, self.phases, self.body, self.total, self.notes = (
            title, phases, body, total, notes
        )  # fmt: skip

    def _table(self, columns: list[int], last: bool) -> Any:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("", no_wrap=True)
        for i in columns:  # as wide as its widest figure: the header wraps at its words
            widest = max(len(Text.from_markup(cells[i])) for _, cells in self.body)
            table.add_column(
                self.phases[i], justify="right", overflow="fold", max_width=max(widest, 8)
            )
        for label, cells in self.body:
            table.add_row(label, *(cells[i] for i in columns))
        if last:
            table.add_row(f"[bold]{self.total[0]}[/bold]", self.total[1])
        return table

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement
        from rich.text import Text

        width = options.max_width
        yield Text(self.title, style="italic", justify="center", overflow="fold")
        chunks: list[list[int]] = [[]]
        unbounded = options.update_width(10**6)  # a measurement is clamped to the width
        for i in range(len(self.phases)):
            trial = [*chunks[-1], i]
            natural = Measurement.get(console, unbounded, self._table(trial, False)).maximum
            fits = natural <= width
            if chunks[-1] and not fits:
                chunks.append([i])
            else:
                chunks[-1] = trial
        for n, chunk in enumerate(chunks):
            yield self._table(chunk, n == len(chunks) - 1)
        for note in self.notes:
            yield Text(note, style="dim")


def _machine_now() -> Any:
    from ctxext.resources.threads import machine_load

    return machine_load()


def _load_lines(verdict: Any) -> list[str]:
    """The machine as it is now against when its speeds were measured: a run gets its fair
    share of the cores (with ctxext's thread policy; see resources.threads), so the times
    scale by the ratio of the two fair shares."""
    from ctxext.resources.threads import MachineLoad

    now, calib = _machine_now(), verdict.calib
    if now is None:
        return []
    state = "busy" if now.busy else "idle"
    line = f"machine {state} now: load {now.average:.1f} on {now.cores} cores"
    if calib.load is None:
        return [line]
    then = MachineLoad(calib.load, now.cores, calib.threads or now.threads)
    lines = [f"{line}; speeds measured at load {calib.load:.1f}"]
    factor = now.slowdown / then.slowdown
    if not 0.8 <= factor <= 1.25:
        total = verdict.seconds
        all_in = "" if total is None else f", {_duration(total * factor)} in all"
        lines.append(
            f"while the load stays so, expect ~{factor:.2g}x the times above (the fair share "
            f"of the cores{all_in})"
        )
    if then.busy:
        lines.append("for an idle machine's times: --recalibrate when it is quiet")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
