"""The Typer app and :func:`main`: registration of the commands, one-line errors, exit codes.

Each command lives in its own module (:mod:`ctxext.cli.extend`, ...) and imports heavy
libraries (torch, transformers) inside the command, so that `ctxext --help` is instant. `plan`
lives here: it runs another command through this app (the check it prints is
:mod:`ctxext.cli.guard`'s).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from ctxext import __version__
from ctxext.cli.eval import eval_command
from ctxext.cli.extend import extend
from ctxext.cli.finetune import finetune
from ctxext.cli.inspect import inspect
from ctxext.cli.recipes import recipes_app, run
from ctxext.cli.tune import tune
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
_out = Console()


def _version(value: bool) -> None:
    if value:
        _out.print(f"ctxext {__version__}")
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


def plan_command(
    ctx: typer.Context,
    command: Annotated[str, typer.Argument(help="eval, finetune or run.", show_default=False)],
) -> None:
    """Print the memory and time COMMAND would need, without loading weights.

    Takes exactly the arguments of `ctxext eval`, `ctxext finetune` or `ctxext run`, e.g.
    `ctxext plan finetune -o out -m yarn -t 32768 --lora-rank 16 --grad-ckpt`.
    """
    # The command's own parsing and validation run (so plan accepts exactly its arguments);
    # the hidden --plan-only makes it stop where it would load weights and print the estimate.
    if command not in ("eval", "finetune", "run"):
        raise CtxextError(f"plan: unknown command '{command}'; use eval, finetune or run")
    raise typer.Exit(_run_app([command, *ctx.args, "--plan-only"]))


# Registered in this order: help lists the commands so.
app.command()(extend)
app.command()(inspect)
app.command("eval")(eval_command)
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

    from ctxext.config.errors import flag_names

    try:
        command = typer.main.get_command(_app_for(argv))
        _plain_placeholders(command)
        with flag_names(_flag_resolver(command, argv)):
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


#: Config keys set by a flag of another name (the rest: key `a_b` <- `--a-b`, `tasks` <- `--task`).
_FLAG_ALIASES = {"include_base": "no_base"}


def _flag_resolver(command: Any, argv: list[str]) -> Any:
    """key path -> the long flag of the command argv[0] names that sets it (None: no flag),
    so a validation error names what the user typed. `run` and `recipes` have none: a recipe
    reports its own keys."""
    sub = getattr(command, "commands", {}).get(argv[0]) if argv else None
    if sub is None or argv[0] in ("run", "recipes", "plan"):
        return None
    flags = {
        p.name: longs[0]
        for p in sub.params
        if (longs := [o for o in getattr(p, "opts", ()) if o.startswith("--")])
    }

    def flag_of(path: tuple[str, ...]) -> str | None:
        head, *rest = path
        for first in (head, head.removesuffix("s")):
            name = "_".join([first, *rest])
            found = flags.get(_FLAG_ALIASES.get(name, name))
            if found is not None:
                return found
        return None

    return flag_of


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
    # Before any command imports torch: how its threads wait (ctxext.resources.threads).
    from ctxext.resources.threads import apply_policy

    apply_policy()
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
