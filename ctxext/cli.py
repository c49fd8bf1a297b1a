"""The `ctxext` command line: parses flags into typed configs and renders results.

No logic lives here beyond parsing and rendering; heavy libraries (torch, transformers) are
imported inside the commands so that `ctxext --help` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext import __version__
from ctxext.cli_options import (
    AllowPickleOpt,
    DatasetConfigOpt,
    FactorOpt,
    ForceOpt,
    MemoryLimitOpt,
    OverwriteOpt,
    PlanOnlyOpt,
    TargetOpt,
    TrustRemoteCodeOpt,
)
from ctxext.errors import CtxextError

_APP_SETTINGS: dict[str, Any] = {
    "name": "ctxext",
    "help": "Extend the context window of pretrained RoPE language models.",
    "no_args_is_help": True,
    "add_completion": False,
    "rich_markup_mode": "rich",
    "pretty_exceptions_enable": False,
}
app = typer.Typer(**_APP_SETTINGS)
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
    str, typer.Option("--method", "-m", help="linear | ntk | yarn | dynamic | llama3 | longrope")
]
FactorFileOpt = Optional[Path]  # noqa: UP045


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
    from ctxext import checkpoint
    from ctxext.cli_tune import read_factor_file
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
        **factor_lists,
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
    with checkpoint.output_lock(job.output):
        record = write_extended(plan, job, allow_pickle=allow_pickle)
    if as_json:
        out.print_json(data=record)
        return
    _render_diff(plan)
    err.print(
        f"[green]wrote[/green] {job.output} ({spec.method}, x{plan.factor:g}: "
        f"{record['trained_length']} -> {plan.new_length} tokens) in {record['seconds']:.2f}s"
    )


def _render_diff(plan: Any) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"{plan.source.name}: config changes", box=box.SIMPLE_HEAD)
    table.add_column("key", overflow="fold")
    table.add_column("before", style="red", overflow="fold")
    table.add_column("after", style="green", overflow="fold")
    for key, old, new in _diff_rows(plan.diff):
        table.add_row(key, _cell(old), _cell(new))
    out.print(table)


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


@app.command("eval")
def eval_command(
    models: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Argument(
            help="Model folders / Hub ids (default: the bundled model).", show_default=False
        ),
    ] = None,
    lengths: Annotated[
        str, typer.Option(help="Comma-separated lengths, e.g. 256,512,1k,2k.")
    ] = "256,512,1024,2048",
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Text file, folder, .jsonl, or dataset name (default: held-out stdlib)."),
    ] = None,
    method: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--method", "-m", help="Scaling method(s) applied in memory; repeatable."),
    ] = None,
    factor: FactorOpt = None,
    target_length: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            "--target-length", "-t", help="New length for --method (default: the longest length)."
        ),
    ] = None,
    beta_fast: Annotated[float, typer.Option(help="YaRN beta_fast.")] = 32.0,
    beta_slow: Annotated[float, typer.Option(help="YaRN beta_slow.")] = 1.0,
    attention_factor: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="YaRN attention factor."),
    ] = None,
    task: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--task",
            help="ppl, passkey, context-use (far-context gain) and/or retrieval; repeatable "
            "(default ppl).",
        ),
    ] = None,
    stride: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Sliding-window stride (default: first L tokens per document)."),
    ] = None,
    num_docs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="At most this many documents (a seeded sample; the same at every length)."
        ),
    ] = None,
    doc_selection: Annotated[
        str,
        typer.Option(
            help="same: the documents long enough for the longest length, at every length (YaRN "
            "protocol); per-length: every document long enough for each length."
        ),
    ] = "same",
    passkey_trials: Annotated[int, typer.Option(help="Keys per length x depth.")] = 5,
    local_window: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="context-use: tokens the local run may read (default: trained length)."),
    ] = None,
    local_stride: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="context-use: stride of the local windows (default window/4; 1 exact)."),
    ] = None,
    retrieval_template: Annotated[
        str,
        typer.Option(help="retrieval: code | text | auto (code on the default stdlib corpus)."),
    ] = "auto",
    no_base: Annotated[bool, typer.Option("--no-base", help="Skip the unscaled rows.")] = False,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl / datasets.")] = "text",
    dataset_config: DatasetConfigOpt = None,
    dataset_split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Split of a dataset (default: test, else validation)."),
    ] = None,
    fallback_encoding: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Encoding for data files that are not UTF-8, e.g. latin-1."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    device_map: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="e.g. 'auto' to spread a large model over devices (accelerate)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling, bootstrap, passkeys.")] = 0,
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Folder for results.json/.csv and plots."),
    ] = None,
    overwrite: OverwriteOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json to stdout.")] = False,
    force: ForceOpt = False,
    memory_limit: MemoryLimitOpt = None,
    plan_only: PlanOnlyOpt = False,
) -> None:
    """Perplexity (and passkey retrieval) at several lengths, models and methods side by side."""
    from ctxext.cli_plan import GuardOptions
    from ctxext.config import EvalConfig, parse_model, positive_int_list

    cfg = parse_model(
        EvalConfig,
        {
            "lengths": positive_int_list(lengths),
            "tasks": task or ["ppl"],
            "data": data,
            "text_field": text_field,
            "dataset_config": dataset_config,
            "dataset_split": dataset_split,
            "fallback_encoding": fallback_encoding,
            "stride": stride,
            "num_docs": num_docs,
            "doc_selection": doc_selection,
            "passkey_trials": passkey_trials,
            "local_window": local_window,
            "local_stride": local_stride,
            "retrieval_template": retrieval_template,
            "include_base": not no_base,
            "dtype": dtype,
            "device_map": device_map,
            "seed": seed,
        },
        "eval options",
    )
    options = {
        "factor": factor,
        "target_length": target_length,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "attention_factor": attention_factor,
    }
    results = evaluate_and_report(
        models or [None],
        method or [],
        options,
        cfg,
        output,
        overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        quiet=as_json,
        guard=GuardOptions(force, memory_limit, plan_only, as_json),
    )
    if as_json:
        from ctxext.report import strict_json

        out.print_json(json.dumps(strict_json(results), allow_nan=False))


def evaluate_and_report(
    models: list[str | None],
    methods: list[str],
    options: dict[str, Any],
    cfg: Any,
    output: Path | None,
    overwrite: bool,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quiet: bool = False,
    guard: Any = None,
) -> dict[str, Any]:
    """Run the evaluation with a progress bar, render it, and write the output folder."""
    from ctxext import checkpoint
    from ctxext.cli_plan import Announcement, GuardOptions, check_eval
    from ctxext.evalrun import plan_variants

    variants = plan_variants(models, methods, options, cfg)
    guard = guard or GuardOptions()
    if output is not None and not guard.plan_only:
        inputs = [checkpoint.resolve_model(m).path for m in models]
        output = checkpoint.check_output_path(output, inputs, overwrite)
    announce = Announcement()
    budget_check = check_eval(models, cfg, guard, len(variants) // len(models), announce)
    locked = output is not None and not guard.plan_only
    with checkpoint.output_lock(output) if locked else contextlib.nullcontext():
        checks = (budget_check, announce)
        return _evaluate(variants, cfg, output, checks, quiet, trust_remote_code, allow_pickle)


def _evaluate(
    variants: list[Any],
    cfg: Any,
    output: Path | None,
    checks: tuple[Any, Any],
    quiet: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> dict[str, Any]:
    from ctxext import checkpoint
    from ctxext.cli_progress import token_progress
    from ctxext.evalrun import run_eval
    from ctxext.report import (
        context_use_table,
        effective_length_line,
        passkey_table,
        ppl_table,
        retrieval_table,
        terminal_plot,
        write_outputs,
    )

    budget_check, announce = checks  # the memory/time check, and a long run's estimate
    with token_progress(err) as progress:

        def factory(what: str, total: int):
            announce.show(progress.console)  # once the first model is loaded
            # Weight downloads report bytes: shown in MiB (the rate column reads per second).
            scale = 2**20 if what.startswith("download ") else 1
            label = f"{what} (MiB)" if scale > 1 else what
            task_id = progress.add_task(label, total=total / scale)
            return lambda done: progress.update(task_id, completed=done / scale)

        results = run_eval(
            variants,
            cfg,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress_factory=factory,
            budget_check=budget_check,
        )
    console = err if quiet else out
    if "ppl" in cfg.tasks:
        console.print(ppl_table(results))
        from rich.text import Text

        console.print(Text.from_ansi(terminal_plot(results)))
    for table in (passkey_table(results), retrieval_table(results), context_use_table(results)):
        if table is not None:
            console.print(table)
    for row in results["runs"]:
        line = effective_length_line(row)
        if line is not None:
            console.print(f"effective context: {line}")
    if output is not None:
        with checkpoint.atomic_output(output) as tmp:
            write_outputs(results, tmp)
        err.print(f"[green]wrote[/green] {output}/results.json, results.csv and plots")
    return results


from ctxext.cli_finetune import finetune  # noqa: E402 (registered after app exists)
from ctxext.cli_plan import plan as plan_command  # noqa: E402
from ctxext.cli_recipes import recipes_app, run  # noqa: E402
from ctxext.cli_tune import tune  # noqa: E402

app.command("finetune")(finetune)
app.command("tune")(tune)
app.command("run")(run)
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command("plan", context_settings=_PASS_THROUGH)(plan_command)
app.add_typer(recipes_app, name="recipes")


def _app_for(argv: list[str]) -> typer.Typer:
    """The app that parses ``argv``: the full one, or only the command argv[0] names.

    Before parsing, Typer turns every registered command into a click command (signature
    inspection, one option object and one pydantic adapter per parameter). Building only the
    command being run keeps the start-up of a config-only `ctxext extend` close to that of a
    one-command Typer app. Top-level help, --version, `recipes` and unknown names use the full
    app, so they read (and suggest) exactly as before.
    """
    name = argv[0] if argv else None
    chosen = [c for c in app.registered_commands if _command_name(c) == name]
    if not chosen:
        return app
    single = typer.Typer(**_APP_SETTINGS)
    single.registered_callback = app.registered_callback  # keeps it a group: `ctxext NAME ...`
    single.registered_commands = chosen
    return single


def _command_name(info: Any) -> str | None:
    # An unnamed command is named by Typer's own rule (function name, lower case, _ -> -).
    from typer.main import get_command_name

    if info.name:
        return info.name
    return get_command_name(info.callback.__name__) if info.callback else None


def _run_app(argv: list[str]) -> int:
    # Typer ships its own click; its exceptions live under typer.exceptions.
    from typer.exceptions import Abort, Exit, TyperException

    try:
        command = typer.main.get_command(_app_for(argv))
        _plain_placeholders(command)
        result = command(args=argv, prog_name="ctxext", standalone_mode=False)
    except Exit as e:
        return getattr(e, "exit_code", 0)
    except Abort:
        _one_line("interrupted")
        return 130
    except TyperException as e:
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _one_line(f"error: {message} (see --help)")
        return 2
    # Outside standalone mode typer turns Ctrl-C (KeyboardInterrupt) into a returned 130;
    # our commands return result objects, never bare ints.
    if isinstance(result, int) and not isinstance(result, bool):
        if result == 130:
            _one_line("interrupted")
        return result
    return 0


def _plain_placeholders(command: Any) -> None:
    """Help shows what a flag takes: nothing after a flag (not Typer's ``<bool>``), and one
    value after a repeatable option (``-m <str>``, not ``<list[str]>``).

    A parameter's metavar is what help prints as its value. The help option exists only once
    a context does, so one is made (resiliently: nothing is checked).
    """
    ctx = command.make_context("ctxext", [], resilient_parsing=True)
    for param in [*command.params, command.get_help_option(ctx)]:
        if getattr(param, "is_flag", False):
            param.metavar = ""
        elif getattr(param, "multiple", False) and param.metavar is None:
            param.metavar = param.display_type(ctx).replace("list[", "").replace("]", "")
    for sub in getattr(command, "commands", {}).values():
        _plain_placeholders(sub)


def _one_line(message: str) -> None:
    # Exactly one line: collapse newlines that library messages sometimes carry.
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()


def _quiet_libraries(debug: bool) -> None:
    """We render our own progress and messages; library bars and warnings would garble them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # already imported (in-process use): use its public API
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not debug:
            hf_logging.set_verbosity_error()


class _Interrupts:
    """Notes every SIGINT (still raising KeyboardInterrupt, as Python's own handler does)."""

    def __init__(self) -> None:
        import signal

        self.seen = False
        self.installed = False
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return  # someone else handles Ctrl-C (an embedding program): leave it alone
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            signal.signal(signal.SIGINT, self._handler)
            self.installed = True

    def _handler(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def __call__(self) -> bool:
        return self.seen

    def restore(self) -> None:
        import signal

        if self.installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors with exit code 2 (1 for resource failures), 130 on Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("CTXEXT_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    _quiet_libraries(debug)
    if "--trust-remote-code" in args:
        _one_line(
            "warning: --trust-remote-code: Python files from the model folder or Hub repo may "
            "be imported and run in this process"
        )
    interrupted = _Interrupts()
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
            _one_line(
                f"error: no space left on the device ({e.filename or ''}); free space and retry"
            )
        else:
            _one_line(f"error: {e.strerror or e} ({e.filename or ''}); add --debug for details")
        code = 1
    except Exception:
        # Ctrl-C inside an import can leave a library half-initialised, and the error that
        # follows is not a KeyboardInterrupt (numpy: a RecursionError): still an interruption.
        if debug or not interrupted():
            raise
        _one_line("interrupted")
        code = 130
    if code == 130:
        # Leave now, with 130 as promised: the interrupted work has already cleaned up (every
        # output is built in a temporary sibling). A normal exit could still die of SIGINT
        # (-2) when the interrupt landed inside a library's embedded interpreter call.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    interrupted.restore()
    sys.exit(code)
