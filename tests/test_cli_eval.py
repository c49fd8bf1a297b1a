"""`ctxext eval` (ctxext/cli/eval.py): what the command prints and where, around the pipeline
(:func:`ctxext.evaluate.run.evaluate_and_report`, tested in test_evaluate_run.py)."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from rich.console import Console
from rich.progress import Progress


def _squeezed(text: str) -> str:
    # Rich wraps and folds long lines at 80 columns when not on a terminal.
    return "".join(text.split())


@pytest.mark.parametrize("as_json", [False, True])
def test_tables_go_to_stdout_or_stderr_and_the_output_is_named(
    capsys, tmp_path, monkeypatch, tiny_llama, as_json
):
    monkeypatch.chdir(tmp_path)
    flags = ["--json"] if as_json else []
    code, out, err = run_cli(
        capsys, "eval", tiny_llama, "--lengths", "128,256", "--num-docs", "2", "-o", "res",
        *flags,
    )  # fmt: skip
    assert code == 0, err
    tables, other = (err, out) if as_json else (out, err)
    assert "perplexity" in tables and "perplexity" not in other
    assert "perplexity vs context length" in tables  # the terminal plot, with the table
    # The folder is announced on stderr by its absolute path once written.
    written = f"wrote {tmp_path / 'res'}/results.json, results.csv and plots"
    assert _squeezed(written) in _squeezed(err)
    if as_json:  # stdout is exactly the results document; the tables came before the files
        assert _squeezed(err).index("perplexity") < _squeezed(err).index(_squeezed(written))
        document = json.loads(out)
        assert document == json.loads((tmp_path / "res" / "results.json").read_text())


def test_downloads_are_counted_in_mib_and_the_estimate_is_shown_first():
    from ctxext.cli.eval import _progress_factory
    from ctxext.cli.guard import Announcement

    console = Console(record=True, width=120, force_terminal=False)
    announce = Announcement(table="estimate: 3 min")
    with Progress(console=console, disable=True) as progress:
        factory = _progress_factory(progress, announce)
        update = factory("download model.safetensors", 3 * 2**20)
        update(2**20)
        factory("ppl 128", 500)(250)
        tasks = {t.description: t for t in progress.tasks}
    assert console.export_text().splitlines() == ["estimate: 3 min"]  # shown once
    mib = tasks["download model.safetensors (MiB)"]
    assert (mib.total, mib.completed) == (3.0, 1.0)
    tokens = tasks["ppl 128"]
    assert (tokens.total, tokens.completed) == (500, 250)


@pytest.mark.parametrize(
    "tasks",
    [["--task", "ppl,passkey"], ["--task", "ppl, passkey"], ["--task", "ppl", "--task", "passkey"]],
    ids=["comma", "comma-space", "repeated"],
)
def test_task_takes_a_comma_list_as_lengths_does(capsys, tasks):
    """`--task ppl,passkey` as `--lengths 256,512` (and repeated flags): passkey is asked for,
    so a length too short for it is refused before anything loads."""
    code, _, err = run_cli(capsys, "eval", "stdlib-llama", *tasks, "--lengths", "16")
    assert code == 2 and "passkey length 16 is too short" in err, err


def test_a_wrong_task_in_a_comma_list_is_named(capsys):
    from ctxext.config import EvalConfig

    code, _, err = run_cli(capsys, "eval", "stdlib-llama", "--task", "ppl,nope", "--lengths", "64")
    assert code == 2 and "unknown task 'nope'" in err and len(err.splitlines()) == 1, err
    # A recipe may write them either way too.
    assert EvalConfig(lengths="64", tasks="ppl,retrieval").tasks == ["ppl", "retrieval"]
    assert EvalConfig(lengths=[64], tasks=["ppl, passkey"]).tasks == ["ppl", "passkey"]


def test_keep_short_rows_are_the_unscaled_model_up_to_the_trained_length(
    capsys, tmp_path, tiny_llama_session
):
    """`eval -m yarn --keep-short --attention-factor 1`: at the trained length 128 the row's
    perplexity is the unscaled row's, at 256 plain YaRN's with the same attention factor."""
    common = ["eval", tiny_llama_session, "--lengths", "128,256", "--num-docs", "2", "-m",
              "yarn", "-f", "2", "--attention-factor", "1", "--json"]  # fmt: skip
    code, out, err = run_cli(capsys, *common, "--keep-short", "-o", tmp_path / "k")
    assert code == 0, err
    base, kept = json.loads(out)["runs"]
    code, out, err = run_cli(capsys, *common, "--no-base", "-o", tmp_path / "y")
    assert code == 0, err
    (yarn,) = json.loads(out)["runs"]
    assert kept["label"].endswith("+yarn x2 keep-short") and yarn["label"].endswith("+yarn x2")
    # (The untrained tiny model barely feels the rescaling: YaRN moves ppl at 128 by ~3e-6.)
    assert kept["ppl"]["128"]["ppl"] == pytest.approx(base["ppl"]["128"]["ppl"], rel=1e-7)
    assert kept["ppl"]["256"]["ppl"] == pytest.approx(yarn["ppl"]["256"]["ppl"], rel=1e-7)
    assert yarn["ppl"]["128"]["ppl"] != pytest.approx(base["ppl"]["128"]["ppl"], rel=1e-6)
