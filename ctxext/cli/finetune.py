"""`ctxext finetune`: flags -> typed configs -> :func:`ctxext.finetune.run_finetune`.

Only typer, rich and the config models (pydantic, whose defaults the options take) are imported
at module level, so `ctxext --help` stays instant. Under `accelerate launch` every process runs
this command; only the main process draws and prints.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli.options import (
    AllowPickleOpt,
    AttnImplementationOpt,
    DatasetConfigOpt,
    FactorOpt,
    ForceOpt,
    MemoryLimitOpt,
    PlanOnlyOpt,
    RecalibrateOpt,
    TargetOpt,
    TrustRemoteCodeOpt,
    field_defaults,
)
from ctxext.config import FinetuneConfig
from ctxext.rope.methods import METHODS

_out = Console()
_err = Console(stderr=True)
_DEFAULT = field_defaults(FinetuneConfig)


def _is_main_process() -> bool:
    # accelerate launch / torchrun set RANK; a plain run has none.
    return os.environ.get("RANK", "0") == "0"


def finetune(
    model: Annotated[
        Optional[str],  # noqa: UP045 (typer needs Optional on 3.10)
        typer.Argument(
            help="Model folder, Hub id, 'stdlib-llama' (the bundled model, the default), or a "
            "checkpoint written by `ctxext extend` (then omit --method).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = ...,  # type: ignore[assignment]
    method: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--method", "-m", help=f"{' | '.join(METHODS)}."),
    ] = None,
    factor: FactorOpt = None,
    target_length: TargetOpt = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (YaRN: 400).")] = _DEFAULT.steps,
    lr: Annotated[float, typer.Option(help="Peak learning rate (YaRN: 2e-5).")] = _DEFAULT.lr,
    warmup_steps: Annotated[
        float,
        typer.Option(help="Linear warm-up: steps, or a fraction below 1 of --steps (HF's rule)."),
    ] = _DEFAULT.warmup_steps,
    lr_schedule: Annotated[
        str, typer.Option(help="After warm-up: constant | cosine | linear.")
    ] = _DEFAULT.lr_schedule,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per process per micro-step.")
    ] = _DEFAULT.batch_size,
    grad_accum: Annotated[
        int, typer.Option(help="Micro-steps per optimizer step.")
    ] = _DEFAULT.grad_accum,
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Training text: stdlib (default), a text file, folder, .jsonl or dataset name."
        ),
    ] = _DEFAULT.data,
    mix: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--mix",
            help="SOURCE:WEIGHT, repeatable, instead of --data: a seeded mixture by weight. "
            "SOURCE: what --data takes, or a synthetic task: retrieval, multikey, multihop "
            "(filler text from the first text source), e.g. --mix stdlib:0.6 --mix multikey:0.4.",
            show_default=False,
        ),
    ] = None,
    task_keys: Annotated[
        int, typer.Option(help="multikey task: facts hidden per sequence.")
    ] = _DEFAULT.tasks.keys,
    task_queries: Annotated[
        int, typer.Option(help="multikey task: facts asked for per sequence.")
    ] = _DEFAULT.tasks.queries,
    task_hops: Annotated[
        int, typer.Option(help="multihop task: references in the chain (hops + 1 facts).")
    ] = _DEFAULT.tasks.hops,
    task_min_length: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="Pack each task sample with independent episodes of log-uniform length "
            "N .. the training length (each with its own BOS and positions from 0), so the "
            "task is trained at every distance, not only the full length.",
            show_default=False,
        ),
    ] = _DEFAULT.tasks.min_length,
    task_composed: Annotated[
        float,
        typer.Option(
            help="Probability that a task fact is in a composed form (syntax drawn from parts, "
            "as the bundled model was trained) rather than a training-grid form; never held out."
        ),
    ] = _DEFAULT.tasks.composed,
    short_fraction: Annotated[
        float,
        typer.Option(
            help="Share of batches packed as episodes of at most the trained length (mixed "
            "context-window training: trains the short mode of a --keep-short extension)."
        ),
    ] = _DEFAULT.short_fraction,
    loss: Annotated[
        str,
        typer.Option(
            help="ce (cross-entropy) | longce (LongCE: tokens re-weighted by long-context gain)."
        ),
    ] = _DEFAULT.loss,
    longce_window: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(
            help="longce: short context W: a cut token reads W to W+S-1 (default: trained length)."
        ),
    ] = _DEFAULT.longce_window,
    longce_stride: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="longce: stride S of the short pass's chunks (default: W/4)."),
    ] = _DEFAULT.longce_stride,
    text_field: Annotated[
        str, typer.Option(help="Text field of .jsonl files/datasets.")
    ] = _DEFAULT.text_field,
    dataset_config: DatasetConfigOpt = _DEFAULT.dataset_config,
    dataset_split: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Split of a dataset (default: train)."),
    ] = _DEFAULT.dataset_split,
    shuffle_buffer: Annotated[
        int, typer.Option(help="Documents in a streamed dataset's seeded shuffle buffer.")
    ] = _DEFAULT.shuffle_buffer,
    fallback_encoding: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Encoding for data files that are not UTF-8, e.g. latin-1."),
    ] = _DEFAULT.fallback_encoding,
    lora_rank: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="LoRA rank (default: full fine-tune)."),
    ] = _DEFAULT.lora_rank,
    lora_alpha: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="LoRA alpha (default 2 x rank)."),
    ] = _DEFAULT.lora_alpha,
    lora_trainable: Annotated[
        str,
        typer.Option(help="With LoRA, also fully train: embed,norm (LongLoRA) or none."),
    ] = ",".join(_DEFAULT.lora_trainable),
    pose: Annotated[
        bool, typer.Option("--pose", help="PoSE: short windows, positions over the target.")
    ] = _DEFAULT.pose,
    train_length: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Tokens per training sequence (PoSE window W; default: target)."),
    ] = _DEFAULT.train_length,
    grad_ckpt: Annotated[
        bool, typer.Option("--grad-ckpt", help="Gradient checkpointing (less memory).")
    ] = _DEFAULT.grad_ckpt,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the global gradient norm to this (recorded).")
    ] = _DEFAULT.max_grad_norm,
    save_every: Annotated[
        int, typer.Option(help="Resumable checkpoint every N steps (0: never).")
    ] = _DEFAULT.save_every,
    seed: Annotated[
        int, typer.Option(help="Seed of data order, PoSE skips, LoRA init.")
    ] = _DEFAULT.seed,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16")
    ] = _DEFAULT.dtype,
    attn_implementation: AttnImplementationOpt = _DEFAULT.attn_implementation,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over, replacing OUT when done.")
    ] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    force: ForceOpt = False,
    memory_limit: MemoryLimitOpt = None,
    plan_only: PlanOnlyOpt = False,
    recalibrate: RecalibrateOpt = False,
) -> None:
    """Fine-tune MODEL at its extended length (full or LoRA, optionally PoSE).

    Writes a merged checkpoint. Several processes: `accelerate launch --multi_gpu
    --num_processes N -m ctxext finetune ...` (data parallel); FSDP2: `accelerate launch
    --config_file ctxext/accelerate_configs/fsdp_8gpu.yaml -m ctxext finetune ...` (GPUs; on CPU
    processes use fsdp_cpu_2proc.yaml). Context parallelism (parallelism_config_cp_size > 1)
    needs CUDA GPUs with SDPA flash/memory-efficient attention and FSDP2; it is refused
    elsewhere.
    """
    from ctxext.config import ExtendConfig, parse_model
    from ctxext.errors import CtxextError
    from ctxext.finetune.loop import run_finetune

    extend = None
    if method is None and (factor is not None or target_length is not None):
        raise CtxextError(
            f"--factor/--target-length need --method ({', '.join(METHODS[:-1])} or {METHODS[-1]})"
        )
    if method is not None:
        spec = {"method": method, "factor": factor, "target_length": target_length}
        extend = parse_model(ExtendConfig, spec, "extend options")
    cfg = parse_model(
        FinetuneConfig,
        {
            "steps": steps,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "lr_schedule": lr_schedule,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "data": data,
            "text_field": text_field,
            "dataset_config": dataset_config,
            "dataset_split": dataset_split,
            "shuffle_buffer": shuffle_buffer,
            "fallback_encoding": fallback_encoding,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "lora_trainable": lora_trainable,
            "pose": pose,
            "train_length": train_length,
            "grad_ckpt": grad_ckpt,
            "max_grad_norm": max_grad_norm,
            "save_every": save_every,
            "seed": seed,
            "dtype": dtype,
            "attn_implementation": attn_implementation,
            "mix": mix or None,
            "tasks": {
                "keys": task_keys,
                "queries": task_queries,
                "hops": task_hops,
                "min_length": task_min_length,
                "composed": task_composed,
            },
            "loss": loss,
            "longce_window": longce_window,
            "longce_stride": longce_stride,
            "short_fraction": short_fraction,
        },
        "finetune options",
    )
    from ctxext import outputs
    from ctxext.cli.guard import GuardOptions, check_finetune

    guard = GuardOptions(force, memory_limit, plan_only, as_json, recalibrate)
    main = _is_main_process()
    # One writer per output (the main process holds the lock); then the memory/time check.
    lock = outputs.output_lock(output) if main and not plan_only else contextlib.nullcontext()
    with lock, _ProgressBar(enabled=main and not as_json) as bar:

        def budget() -> None:  # after finetune's cheap checks, before anything is loaded
            bar.announce = check_finetune(model, output, extend, cfg, guard)

        summary = run_finetune(
            model,
            output,
            extend,
            cfg,  # type: ignore[arg-type]
            resume=resume,
            overwrite=overwrite,
            progress=bar,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            budget_check=budget if main else None,
        )
    if not _is_main_process():
        return
    if as_json:
        _out.print_json(data=summary)
    else:
        _render_summary(summary)


class _ProgressBar:
    """Progress on stderr driven by run_finetune's progress events: on a terminal a spinner,
    then a Rich bar; otherwise plain lines (see cli.progress.PhaseLog)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.announce: Any = None  # cli.guard.Announcement: shown when training starts
        self.progress: Any = None
        self.task: Any = None
        self.status: Any = None
        self.log: Any = None  # a PhaseLog before training starts, when stderr is no terminal

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_status()
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _start(self, total: int, completed: int) -> None:
        # Started only when training starts: an early error then prints nothing but its line
        # (and the bar itself vanishes if training fails: see cli.progress._Progress).
        from ctxext.cli.progress import step_progress

        self.progress = step_progress(_err)
        self.progress.__enter__()
        self.task = self.progress.add_task(
            "finetune", total=total, completed=completed, loss="-", tps="-"
        )

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "warning":  # printed even with --json (on stderr)
            (self.progress.console if self.progress is not None else _err).print(
                f"[yellow]warning:[/yellow] {info['message']}", soft_wrap=True
            )
            return
        if event == "start" and self.announce is not None:
            self._stop_status()
            self.announce.show(_err)
        if not self.enabled:
            return
        if self.progress is None and event in ("status", "packing"):
            self._before_training(event, info)
        elif event == "start":
            self._stop_status()
            self._start(info["total"], info["completed"])
        elif event == "step" and self.progress is not None:
            self.progress.update(
                self.task,
                completed=info["step"],
                loss=f"{info['loss']:.4f}",
                tps=f"{info['tokens_per_s']:,.0f}",
            )
        elif event in ("status", "checkpoint") and self.progress is not None:
            text = info.get("message") or f"checkpoint {info['path']}"
            self.progress.console.print(f"[dim]{text}[/dim]", soft_wrap=True)

    def _before_training(self, event: str, info: dict[str, Any]) -> None:
        """Loading and packing: a transient spinner on a terminal (it vanishes, so an error
        that follows stays a single line), plain lines in a log for the steps that last."""
        if not _err.is_terminal:  # each step a phase, said only once it lasts (PhaseLog.lazy)
            from ctxext.cli.progress import PhaseLog

            self.log = self.log or PhaseLog(_err, lazy=True)
            if event == "status":
                self.log.finish_all()
                self.log.start("status", info["message"], None)
                return
            key = f"packing {info['source']}"
            if key not in self.log:
                self.log.finish("status")  # "packing training data" is this phase
                self.log.start(key, key, info["total"], unit="tok")
            self.log.update(key, info["done"])
            return
        message = info.get("message") or (
            f"packing {info['source']}: {info['done']:,}/{info['total']:,} tokens"
        )
        if self.status is None:
            self.status = _err.status(message)
            self.status.start()
        else:
            self.status.update(message)

    def _stop_status(self) -> None:
        if self.log is not None:
            self.log.finish_all()
        if self.status is not None:
            self.status.stop()
            self.status = None


def _render_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    from ctxext.text import plural

    table = Table(title="ctxext finetune", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    lora = f"LoRA r={summary['lora_rank']}" if summary["lora_rank"] else "full"
    pose = f", PoSE window {summary['train_length']}" if summary["pose"] else ""
    rows = [
        ("output", summary["output"]),
        (
            "extension",
            f"{summary['method']} x{summary['factor']:g}: "
            f"{summary['trained_length']} -> {summary['target_length']} tokens",
        ),
        (
            "training",
            f"{lora}{pose}, {plural(summary['steps'], 'step')} x "
            f"{plural(summary['global_batch'], 'sequence')} of {summary['train_length']} tokens "
            f"({plural(summary['num_processes'], 'process', 'processes')}"
            f"{', FSDP2 sharded' if summary.get('fsdp') else ''})",
        ),
        ("trainable", f"{summary['trainable_parameters']:,} of {summary['parameters']:,}"),
        ("final loss", "-" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"),
        (
            "throughput",
            f"{summary['tokens_per_s'] or 0:,.0f} tokens/s over {summary['seconds']:.1f}s",
        ),
        (
            "data",
            f"{summary['data']['source']}{_split(summary['data'])} "
            f"({summary['data']['tokens']:,} tokens, "
            f"fingerprint {summary['data']['fingerprint']})",
        ),
    ]
    loss = summary.get("loss")
    if loss is not None:
        rows.append(("loss", f"LongCE (short window {loss['window']}, stride {loss['stride']})"))
    if summary.get("router_aux_loss"):
        rows.append(("router aux loss", summary["router_aux_loss"]))
    if summary["resumed_from_step"] is not None:
        rows.append(("resumed", f"from step {summary['resumed_from_step']}"))
    for key, value in rows:
        table.add_row(key, str(value))
    _out.print(table)


def _split(data: dict[str, Any]) -> str:
    return f" [{data['split']}]" if data.get("split") else ""
