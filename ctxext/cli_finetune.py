"""`ctxext finetune`: flags -> typed configs -> :func:`ctxext.finetune.run_finetune`.

Only typer and rich are imported at module level, so `ctxext --help` stays instant. Under
`accelerate launch` every process runs this command; only the main process draws and prints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ctxext.cli_options import AllowPickleOpt, FactorOpt, TargetOpt, TrustRemoteCodeOpt

_out = Console()
_err = Console(stderr=True)


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
        typer.Option("--method", "-m", help="linear | ntk | yarn | dynamic | llama3."),
    ] = None,
    factor: FactorOpt = None,
    target_length: TargetOpt = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps (YaRN: 400).")] = 400,
    lr: Annotated[float, typer.Option(help="Peak learning rate (YaRN: 2e-5).")] = 2e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 20,
    lr_schedule: Annotated[
        str, typer.Option(help="After warm-up: constant | cosine | linear.")
    ] = "constant",
    batch_size: Annotated[int, typer.Option(help="Sequences per process per micro-step.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-steps per optimizer step.")] = 1,
    data: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Training text: stdlib (default), a text file, folder, .jsonl or dataset name."
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl files/datasets.")] = "text",
    fallback_encoding: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Encoding for data files that are not UTF-8, e.g. latin-1."),
    ] = None,
    lora_rank: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="LoRA rank (default: full fine-tune)."),
    ] = None,
    lora_alpha: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="LoRA alpha (default 2 x rank)."),
    ] = None,
    lora_trainable: Annotated[
        str,
        typer.Option(help="With LoRA, also fully train: embed,norm (LongLoRA) or none."),
    ] = "embed,norm",
    pose: Annotated[
        bool, typer.Option("--pose", help="PoSE: short windows, positions over the target.")
    ] = False,
    train_length: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Tokens per training sequence (PoSE window W; default: target)."),
    ] = None,
    grad_ckpt: Annotated[
        bool, typer.Option("--grad-ckpt", help="Gradient checkpointing (less memory).")
    ] = False,
    save_every: Annotated[
        int, typer.Option(help="Resumable checkpoint every N steps (0: never).")
    ] = 50,
    seed: Annotated[int, typer.Option(help="Seed of data order, PoSE skips, LoRA init.")] = 0,
    dtype: Annotated[
        str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16")
    ] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over, replacing OUT when done.")
    ] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Fine-tune MODEL at its extended length (full or LoRA, optionally PoSE); write a merged
    checkpoint. Several processes: `accelerate launch --multi_gpu --num_processes N -m ctxext
    finetune ...` (data parallel); FSDP2: `accelerate launch --config_file
    ctxext/accelerate_configs/fsdp_8gpu.yaml -m ctxext finetune ...` (GPUs; on CPU processes use
    fsdp_cpu_2proc.yaml). Context parallelism (parallelism_config_cp_size > 1) needs CUDA GPUs
    with SDPA flash/memory-efficient attention and FSDP2; it is refused elsewhere."""
    from ctxext.config import ExtendConfig, parse_model
    from ctxext.errors import CtxextError
    from ctxext.finetune import FinetuneConfig, run_finetune

    extend = None
    if method is None and (factor is not None or target_length is not None):
        raise CtxextError(
            "--factor/--target-length need --method (linear, ntk, yarn, dynamic or llama3)"
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
            "fallback_encoding": fallback_encoding,
            "lora_rank": lora_rank,
            "lora_alpha": lora_alpha,
            "lora_trainable": lora_trainable,
            "pose": pose,
            "train_length": train_length,
            "grad_ckpt": grad_ckpt,
            "save_every": save_every,
            "seed": seed,
            "dtype": dtype,
        },
        "finetune options",
    )
    _quiet_transformers()
    with _ProgressBar(enabled=_is_main_process() and not as_json) as bar:
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
        )
    if not _is_main_process():
        return
    if as_json:
        _out.print_json(data=summary)
    else:
        _render_summary(summary)


def _quiet_transformers() -> None:
    # Our bar shows progress; transformers' per-file loading/saving bars would interleave.
    from transformers.utils import logging

    logging.disable_progress_bar()


class _ProgressBar:
    """Rich progress bar (stderr) driven by run_finetune's progress events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Any = None
        self.task: Any = None
        self.status: Any = None

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_status()
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def _start(self, total: int, completed: int) -> None:
        # Started only when training starts: an early error then prints nothing but its line
        # (and the bar itself vanishes if training fails: see cli_progress._Progress).
        from ctxext.cli_progress import step_progress

        self.progress = step_progress(_err)
        self.progress.__enter__()
        self.task = self.progress.add_task(
            "finetune", total=total, completed=completed, loss="-", tps="-"
        )

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event == "status" and self.progress is None:
            # A transient spinner: it vanishes, so an error that follows stays a single line.
            if self.status is None:
                self.status = _err.status(info["message"])
                self.status.start()
            else:
                self.status.update(info["message"])
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
            self.progress.console.print(f"[dim]{text}[/dim]")

    def _stop_status(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _render_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

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
            f"{lora}{pose}, {summary['steps']} steps x {summary['global_batch']} "
            f"sequences of {summary['train_length']} tokens ({summary['num_processes']} process(es)"
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
            f"{summary['data']['source']} ({summary['data']['tokens']:,} tokens, "
            f"fingerprint {summary['data']['fingerprint']})",
        ),
    ]
    if summary["resumed_from_step"] is not None:
        rows.append(("resumed", f"from step {summary['resumed_from_step']}"))
    for key, value in rows:
        table.add_row(key, str(value))
    _out.print(table)
