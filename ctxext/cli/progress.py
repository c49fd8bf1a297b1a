"""Progress bars for the commands that run models (imported lazily: Rich's progress module
costs tens of milliseconds, which `extend` and `--help` should not pay)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _TokensPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- tok/s" if speed is None else f"{speed:,.0f} tok/s", style="cyan")


class _Progress(Progress):
    """Rich progress that leaves no trace when the command fails, so errors stay one line."""

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        super().__exit__(exc_type, exc, tb)


def token_progress(console: Console) -> Progress:
    """A progress bar over tokens with throughput and ETA, drawn on `console` (stderr)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _TokensPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        # Piped or logged stderr gets no bar: Rich would leave blank lines there.
        disable=not console.is_terminal,
    )


def step_progress(console: Console) -> Progress:
    """A progress bar over training steps with loss, tokens/s and ETA (task fields loss, tps)."""
    return _Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,  # no stray lines in logs and pipes
    )


def search_progress(console: Console) -> Progress:
    """A progress bar over a search's budget (document forwards) with the best so far."""
    return _Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} forwards"),
        TextColumn("[cyan]{task.fields[best]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
