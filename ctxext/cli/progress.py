"""Progress for the commands that run models (imported lazily: Rich's progress module costs
tens of milliseconds, which `extend` and `--help` should not pay).

On a terminal, Rich bars. Anywhere else (a log file, a pipe, CI) the same tasks are written as
plain lines by :class:`PhaseLog`: one when a phase starts, at most one every
``CTXEXT_PROGRESS_INTERVAL`` seconds (default 30) while it runs, with count, rate, elapsed time
and ETA, and one when it ends.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from ctxext.errors import CtxextError

#: Seconds between two progress lines of one phase when stderr is not a terminal.
INTERVAL_ENV = "CTXEXT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0


def log_interval() -> float:
    """``CTXEXT_PROGRESS_INTERVAL`` in seconds (0: a line at every update), default 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise CtxextError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds >= 0: set it to e.g. 30 "
            "(0 prints every update), or unset it"
        )
    return value


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _rate(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


@dataclass
class _Phase:
    name: str
    total: float | None
    unit: str
    started: float
    start_count: float
    last_line: float
    completed: float = 0.0
    detail: str = ""
    announced: bool = False  # its start line is out


class PhaseLog:
    """Progress as plain lines for a console that is not a terminal (see the module doc).

    Phases are keyed by any hashable; ``clock`` is injectable for tests. A ``lazy`` log (for
    the loading before work starts, where bad input is refused) says nothing of a phase shorter
    than ``interval``: its start line comes with its first progress line, so a quick phase that
    ends in an error leaves the error the only line.
    """

    def __init__(
        self,
        console: Console,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        lazy: bool = False,
    ) -> None:
        self.console = console
        self.interval = log_interval() if interval is None else interval
        self.clock = clock
        self.lazy = lazy
        self._open: dict[Any, _Phase] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._open

    def line(self, text: str) -> None:
        """One plain line (no markup, no wrapping: a log keeps it whole)."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start(
        self,
        key: Any,
        name: str,
        total: float | None,
        completed: float = 0,
        unit: str = "",
    ) -> None:
        now = self.clock()
        self._open[key] = phase = _Phase(name, total, unit, now, completed, now, completed)
        if not self.lazy:
            self._start_line(phase)

    def _start_line(self, phase: _Phase) -> None:
        phase.announced = True
        size = "" if phase.total is None else f" ({_count(phase.total)} {phase.unit})"
        resumed = f", from {_count(phase.start_count)}" if phase.start_count else ""
        self.line(f"{phase.name}: started{size.replace(' )', ')')}{resumed}")

    def update(
        self,
        key: Any,
        completed: float,
        total: float | None = None,
        name: str | None = None,
        detail: str = "",
    ) -> None:
        """Record progress; a line when ``interval`` has passed since the last one, and the end
        line when ``completed`` reaches the total."""
        phase = self._open.get(key)
        if phase is None:
            return
        phase.completed = completed
        phase.total = phase.total if total is None else total
        phase.name = name or phase.name
        phase.detail = detail or phase.detail
        if phase.total is not None and completed >= phase.total:
            self.finish(key)
            return
        now = self.clock()
        if now - phase.last_line >= self.interval:
            if not phase.announced:
                self._start_line(phase)
            phase.last_line = now
            self.line(self._progress_line(phase, now))

    def finish(self, key: Any) -> None:
        """The end line of one phase (nothing if it was not open, or a lazy log's phase was
        shorter than the interval)."""
        phase = self._open.pop(key, None)
        if phase is None:
            return
        elapsed = self.clock() - phase.started
        if not phase.announced:
            if elapsed < self.interval:
                return
            self._start_line(phase)
        done = phase.completed - phase.start_count
        # No rate for a phase shorter than a second: it would say little.
        rate = f", {_rate(done / elapsed)} {phase.unit}/s" if elapsed >= 1 and done else ""
        count = ""
        if phase.total is not None or phase.completed:
            count = f", {_count(phase.completed)} {phase.unit}".rstrip()
        detail = f"; {phase.detail}" if phase.detail else ""
        self.line(f"{phase.name}: done{count} in {_duration(elapsed)}{rate}{detail}")

    def finish_all(self) -> None:
        for key in list(self._open):
            self.finish(key)

    def _progress_line(self, phase: _Phase, now: float) -> str:
        elapsed = now - phase.started
        done = phase.completed - phase.start_count
        count = _count(phase.completed)
        if phase.total is not None:
            pct = phase.completed / phase.total if phase.total else 1.0
            count = f"{count}/{_count(phase.total)} {phase.unit} ({pct:.0%})"
        else:
            count = f"{count} {phase.unit}"
        parts = [f"{phase.name}: {count}".rstrip()]
        rate = done / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{_rate(rate)} {phase.unit}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if rate > 0 and phase.total is not None:
            parts.append(f"ETA {_duration((phase.total - phase.completed) / rate)}")
        line = ", ".join(parts)
        return f"{line}; {phase.detail}" if phase.detail else line


class _Rate(ProgressColumn):
    """Throughput in the task's unit (field ``unit``; tokens by default)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "tok")
        if speed is None:
            return Text(f"-- {unit}/s", style="cyan")
        return Text(f"{_rate(speed)} {unit}/s", style="cyan")


class _Progress(Progress):
    """Rich progress that leaves no trace on a terminal when the command fails (so errors stay
    one line), and writes plain lines through a :class:`PhaseLog` when the console is not a
    terminal (Rich would draw nothing there).

    Each task's unit is its ``unit`` field (else ``unit``); ``detail(task)`` adds the task's
    own numbers (loss, best so far) to its lines.
    """

    def __init__(
        self,
        *columns: str | ProgressColumn,
        unit: str,
        detail: Callable[[Task], str] = lambda task: "",
        console: Console,
    ) -> None:
        plain = not console.is_terminal
        super().__init__(*columns, console=console, transient=False, disable=plain)
        self.unit, self.detail = unit, detail
        self.log = PhaseLog(console) if plain else None

    def add_task(
        self,
        description: str,
        start: bool = True,
        total: float | None = 100.0,
        completed: int = 0,
        visible: bool = True,
        **fields: Any,
    ) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        if self.log is not None:
            unit = fields.get("unit", self.unit)
            self.log.start(task_id, description, total, completed, unit)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if self.log is not None:
            task = self._tasks[task_id]
            self.log.update(
                task_id, task.completed, task.total, task.description, self.detail(task)
            )

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.live.transient = True
        elif self.log is not None:
            self.log.finish_all()
        super().__exit__(exc_type, exc, tb)


def token_progress(console: Console) -> Progress:
    """A progress bar over tokens with throughput and ETA, drawn on `console` (stderr)."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        unit="tok",
    )


def _step_detail(task: Task) -> str:
    loss, tps = task.fields.get("loss", "-"), task.fields.get("tps", "-")
    return "" if loss == "-" else f"loss {loss}, {tps} tok/s"


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
        unit="steps",
        detail=_step_detail,
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
        unit="forwards",
        detail=lambda task: task.fields.get("best", ""),
    )
