"""`ctxext eval`: flags -> :class:`ctxext.config.EvalConfig` ->
:func:`ctxext.evaluate.run.evaluate_and_report` -> tables, a terminal plot and the output folder.

Only typer, rich and the config models (pydantic, whose defaults the options take) are imported
at module level, so `ctxext --help` stays instant.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli.options import (
    AllowPickleOpt,
    AttnImplementationOpt,
    BetaFastOpt,
    BetaSlowOpt,
    DatasetConfigOpt,
    FactorOpt,
    ForceOpt,
    KeepShortOpt,
    MemoryLimitOpt,
    OverwriteOpt,
    PlanOnlyOpt,
    RecalibrateOpt,
    TrustRemoteCodeOpt,
    field_defaults,
)
from ctxext.config import EvalConfig
from ctxext.rope.methods import OPTION_DEFAULTS

_out = Console()
_err = Console(stderr=True)
_DEFAULT = field_defaults(EvalConfig)


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
    ] = _DEFAULT.data,
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
    beta_fast: BetaFastOpt = OPTION_DEFAULTS["beta_fast"],
    beta_slow: BetaSlowOpt = OPTION_DEFAULTS["beta_slow"],
    attention_factor: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="YaRN attention factor."),
    ] = None,
    keep_short: KeepShortOpt = False,
    task: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--task",
            help="ppl, passkey, context-use (far-context gain), retrieval and/or longppl "
            "(key tokens' perplexity): comma-separated or repeated, e.g. ppl,retrieval "
            "(default ppl).",
        ),
    ] = None,
    stride: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Sliding-window stride (default: first L tokens per document)."),
    ] = _DEFAULT.stride,
    num_docs: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="At most this many documents (a seeded sample; the same at every length)."
        ),
    ] = _DEFAULT.num_docs,
    doc_selection: Annotated[
        str,
        typer.Option(
            help="same: the documents long enough for the longest length, at every length (YaRN "
            "protocol); per-length: every document long enough for each length."
        ),
    ] = _DEFAULT.doc_selection,
    passkey_trials: Annotated[
        int, typer.Option(help="Keys per length x depth.")
    ] = _DEFAULT.passkey_trials,
    passkey_depths: Annotated[
        str,
        typer.Option(
            help="passkey, retrieval: where the key sits, as fractions of the filler before "
            "it, comma-separated."
        ),
    ] = ",".join(map(str, _DEFAULT.passkey_depths)),
    local_window: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="context-use: positions of a local window, BOS + the last W-1 tokens; "
            "longppl: short context W (default: trained length)."
        ),
    ] = _DEFAULT.local_window,
    local_stride: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="context-use: stride of the local windows (default window/4; 1 exact); "
            "longppl: stride of its chunks of W+S (default W/4)."
        ),
    ] = _DEFAULT.local_stride,
    retrieval_template: Annotated[
        str,
        typer.Option(
            help="retrieval: heldout | train | all | template names (ctxext.evaluate.needles) | text "
            "(the passkey) | auto (= heldout)."
        ),
    ] = _DEFAULT.retrieval_template,
    effective_threshold: Annotated[
        float,
        typer.Option(
            help="Floor of the effective-length rule, in (0, 1]: a retrieval family is judged "
            "where the unscaled model retrieves at least this share at its trained length, "
            "against max(floor, 0.9 x that share)."
        ),
    ] = _DEFAULT.effective_threshold,
    reference_model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="The model whose unscaled retrieval at its trained length judges every row's "
            "effective length, e.g. the base model of a fine-tuned checkpoint (default: each "
            "row's own model, with the rope it was trained with)."
        ),
    ] = _DEFAULT.reference_model,
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Skip the unscaled rows.")
    ] = not _DEFAULT.include_base,
    text_field: Annotated[
        str, typer.Option(help="Text field of .jsonl / datasets.")
    ] = _DEFAULT.text_field,
    dataset_config: DatasetConfigOpt = _DEFAULT.dataset_config,
    dataset_split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Split of a dataset (default: test, else validation)."),
    ] = _DEFAULT.dataset_split,
    fallback_encoding: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Encoding for data files that are not UTF-8, e.g. latin-1."),
    ] = _DEFAULT.fallback_encoding,
    dtype: Annotated[
        str, typer.Option(help="auto | float32 | bfloat16 | float16.")
    ] = _DEFAULT.dtype,
    attn_implementation: AttnImplementationOpt = _DEFAULT.attn_implementation,
    device_map: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="e.g. 'auto' to spread a large model over devices (accelerate)."),
    ] = _DEFAULT.device_map,
    seed: Annotated[
        int, typer.Option(help="Seed for sampling, bootstrap, passkeys.")
    ] = _DEFAULT.seed,
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
    recalibrate: RecalibrateOpt = False,
) -> None:
    """Perplexity, passkey, far-context gain and retrieval: models and methods side by side.

    --task picks them (default ppl); context-use + retrieval give each effective context length.
    """
    from ctxext.cli.guard import GuardOptions
    from ctxext.config import fraction_list, parse_model, positive_int_list
    from ctxext.evaluate.run import evaluate_and_report

    cfg = parse_model(
        EvalConfig,
        {
            "lengths": positive_int_list(lengths),
            **({"tasks": task} if task else {}),  # else the model's default
            "data": data,
            "text_field": text_field,
            "dataset_config": dataset_config,
            "dataset_split": dataset_split,
            "fallback_encoding": fallback_encoding,
            "stride": stride,
            "num_docs": num_docs,
            "doc_selection": doc_selection,
            "passkey_trials": passkey_trials,
            "passkey_depths": fraction_list(passkey_depths, "--passkey-depths"),
            "local_window": local_window,
            "local_stride": local_stride,
            "retrieval_template": retrieval_template,
            "effective_threshold": effective_threshold,
            "reference_model": reference_model,
            "include_base": not no_base,
            "dtype": dtype,
            "attn_implementation": attn_implementation,
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
        "keep_short": keep_short,
    }
    guard = GuardOptions(force, memory_limit, plan_only, as_json, recalibrate)
    results = evaluate_and_report(
        models or [None],
        method or [],
        options,
        cfg,
        output,
        overwrite,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        hooks=_hooks(models or [None], cfg, guard),
    )
    if as_json:
        from ctxext.report.files import strict_json

        _out.print_json(json.dumps(strict_json(results), allow_nan=False))


def _hooks(models: list[str | None], cfg: Any, guard: Any) -> Any:
    """The memory/time check, a token progress bar (stderr) and the tables (stderr with
    --json, so stdout stays the JSON document)."""
    from ctxext.cli.guard import Announcement, check_eval
    from ctxext.evaluate.run import EvalHooks

    announce = Announcement()  # a long run's estimate, shown once the first model is loaded

    def budget(variants_per_model: int) -> Any:
        return check_eval(models, cfg, guard, variants_per_model, announce)

    @contextlib.contextmanager
    def progress() -> Iterator[Any]:
        from ctxext.cli.progress import token_progress

        with token_progress(_err) as bar:
            yield _progress_factory(bar, announce)

    def render(results: dict[str, Any]) -> None:
        _render(results, cfg, _err if guard.as_json else _out)

    def written(output: Path) -> None:
        _err.print(f"[green]wrote[/green] {output}/results.json, results.csv and plots")

    return EvalHooks(budget, progress, render, written, plan_only=guard.plan_only)


def _progress_factory(progress: Any, announce: Any) -> Any:
    def factory(what: str, total: int):
        announce.show(progress.console)  # once the first model is loaded
        # Weight downloads report bytes: shown in MiB (the rate column reads per second).
        scale = 2**20 if what.startswith("download ") else 1
        label, unit = (f"{what} (MiB)", "MiB") if scale > 1 else (what, "tok")
        task_id = progress.add_task(label, total=total / scale, unit=unit)
        return lambda done: progress.update(task_id, completed=done / scale)

    return factory


def _render(results: dict[str, Any], cfg: Any, console: Console) -> None:
    from ctxext.report.cells import effective_length_line, sliding_window_lines
    from ctxext.report.plots import terminal_plot
    from ctxext.report.tables import (
        context_use_table,
        effective_table,
        key_token_table,
        passkey_table,
        ppl_table,
        retrieval_table,
    )

    if "ppl" in cfg.tasks:
        console.print(ppl_table(results))
        from rich.text import Text

        console.print(Text.from_ansi(terminal_plot(results)))
    tables = (passkey_table, retrieval_table, context_use_table, key_token_table, effective_table)
    for table in (make(results) for make in tables):
        if table is not None:
            console.print(table)
    for row in results["runs"]:
        line = effective_length_line(row)
        if line is not None:
            console.print(f"effective context: {line}", soft_wrap=True)
    if "effective_length" in results["protocol"]:
        console.print(f"[dim]rule: {results['protocol']['effective_length']}[/dim]")
    for line in sliding_window_lines(results):
        console.print(f"[yellow]sliding window:[/yellow] {line}", soft_wrap=True)
