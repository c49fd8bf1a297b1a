"""The app (ctxext/cli/app.py): help, version, the single-command start-up path, one-line
errors with exit code 2, and --debug tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import run_cli


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("ctxext ")
    for cmd in ("extend", "inspect"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "Usage" in out


def test_single_command_app_parses_like_the_full_app():
    # main() builds only the command argv names (start-up time); it must be the same command.
    from typer.main import get_command

    from ctxext.cli.app import _app_for, app

    full = get_command(app)
    for name in ("extend", "inspect", "eval", "finetune", "run"):
        single = get_command(_app_for([name, "--help"]))
        assert list(single.commands) == [name]
        mine, theirs = single.commands[name], full.commands[name]
        assert [p.opts for p in mine.params] == [p.opts for p in theirs.params]
        assert [p.default for p in mine.params] == [p.default for p in theirs.params]
        assert mine.help == theirs.help
    for argv in ([], ["--help"], ["--version"], ["recipes", "list"], ["extnd"]):
        assert _app_for(argv) is app


def test_option_defaults_are_the_config_models_defaults():
    """A flag left out means what the same key left out of a recipe means: every option named
    after a field of the command's config model has that field's default (lists as the
    comma-separated text the option takes; --no-base is include_base negated)."""
    from typer.main import get_command

    from ctxext.cli.app import app
    from ctxext.config import EvalConfig, ExtendConfig, FinetuneConfig, TuneConfig

    def as_option(value):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value

    commands = get_command(app).commands
    checked = 0
    for name, models in (
        ("eval", [EvalConfig, ExtendConfig]),
        ("finetune", [FinetuneConfig]),
        ("tune", [TuneConfig]),
        ("extend", [ExtendConfig]),
    ):
        for param in commands[name].params:
            field = next(
                (m.model_fields[param.name] for m in models if param.name in m.model_fields), None
            )
            if field is None or field.is_required() or param.name == "model":
                continue
            expected = as_option(field.get_default(call_default_factory=True))
            assert param.default == expected, (name, param.name, param.default, expected)
            checked += 1
        if name == "eval":
            no_base = next(p for p in commands[name].params if p.name == "no_base")
            assert no_base.default is not EvalConfig.model_fields["include_base"].default
    assert checked >= 60  # 61 when written


def test_missing_and_malformed_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys, "extend", tmp_path / "empty", "-o", tmp_path / "o", "-m", "yarn", "-f", "2"
    )
    assert code == 2 and "config.json" in err and err.count("\n") == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "inspect", bad)
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    (tmp_path / "notype").mkdir()
    (tmp_path / "notype" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    code, _, err = run_cli(capsys, "inspect", tmp_path / "notype")
    assert code == 2 and "model_type" in err


def test_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "ctxext", "inspect", str(tmp_path / "nope")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
