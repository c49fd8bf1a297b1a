"""Progress bars (ctxext/cli/progress.py): shown on terminals, gone when the command fails."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from ctxext.cli.progress import step_progress, token_progress


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


@pytest.mark.parametrize("factory", [token_progress, step_progress])
def test_bar_stays_after_success_and_vanishes_after_failure(factory):
    fields = {"loss": "-", "tps": "-"}
    ok = factory(_terminal())
    with ok:
        ok.update(ok.add_task("work", total=4, **fields), completed=4)
    assert not ok.live.transient  # the finished bar stays on screen
    assert "4/4" in ok.console.file.getvalue()

    failed = factory(_terminal())
    with pytest.raises(RuntimeError), failed:
        failed.add_task("work", total=4, **fields)
        raise RuntimeError("boom")
    assert failed.live.transient  # erased, so the error that follows is the only line


@pytest.mark.parametrize("factory", [token_progress, step_progress])
def test_no_bar_when_not_a_terminal(factory):
    console = Console(file=io.StringIO(), force_terminal=False)
    bar = factory(console)
    with bar:
        bar.update(bar.add_task("work", total=2, loss="-", tps="-"), completed=2)
    assert console.file.getvalue() == ""
