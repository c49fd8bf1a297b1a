"""What a fine-tune will do, decided before any weight is loaded or any file written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxext.config import ExtendConfig, FinetuneConfig, TaskOptions
from ctxext.errors import CtxextError
from ctxext.finetune.episodes import check_episodes_supported
from ctxext.finetune.state import newest_checkpoint, work_dir

#: Fault injection for tests and drills: the loss of this optimizer step (1-based) is made NaN
#: (read once per run; the divergence check then stops the run as it would a real blow-up).
INJECT_NAN_ENV = "CTXEXT_INJECT_NAN_AT_STEP"


@dataclass
class RunSetup:
    """Everything decided before any weight is loaded or any file written."""

    source: Any  # locate.ResolvedModel
    config_before: dict[str, Any]
    extend: ExtendConfig | None
    method: str
    factor: float
    trained_length: int
    target_length: int
    seq_length: int  # tokens per training sequence (W with PoSE)
    out: Path
    work: Path
    nan_at_step: int | None = None  # fault injection ($CTXEXT_INJECT_NAN_AT_STEP)
    longce_window: int | None = None  # loss longce: the short pass's window and stride
    longce_stride: int | None = None


def setup_run(
    model: str | None,
    output: Path,
    extend: ExtendConfig | None,
    cfg: FinetuneConfig,
    *,
    resume: bool,
    overwrite: bool,
) -> RunSetup:
    """Validate the request against the model's config and the file system (no writes)."""
    from ctxext import checkpoint, locate, outputs, rope
    from ctxext.modeling import check_causal_lm

    source = locate.resolve_model(model)
    config = checkpoint.read_config(source.path)
    check_causal_lm(config, source.name)
    info = rope.analyze(config)
    if extend is not None and info.existing_scaling is not None:
        raise CtxextError(
            f"{source.name} is already extended ({info.existing_scaling.get('rope_type')}): omit "
            "--method/--factor to fine-tune it at its extended length, or pass the base model"
        )
    if extend is not None:
        factor = rope.validate_request(info, extend.method, extend.factor, extend.target_length)
        method = extend.method
    else:
        method, factor = _existing_extension(info, source.name)
    target = rope.new_length(info.trained_length, factor)
    seq = cfg.train_length or target
    if seq > target:
        raise CtxextError(
            f"train length {seq} is longer than the target length {target}: pass "
            f"--train-length <= {target} (PoSE windows are usually the trained length, "
            f"{info.trained_length})"
        )
    longce = _longce_windows(cfg, info.trained_length, seq)
    check_training_data(cfg, config, source.path, info.trained_length, seq)
    out = outputs.check_output_path(output, [source.path], overwrite=True)
    work = work_dir(out)
    _check_output_state(out, work, resume=resume, overwrite=overwrite)
    return RunSetup(
        source=source,
        config_before=config,
        extend=extend,
        method=method,
        factor=factor,
        trained_length=info.trained_length,
        target_length=target,
        seq_length=seq,
        out=out,
        work=work,
        nan_at_step=_injected_nan_step(),
        longce_window=longce[0],
        longce_stride=longce[1],
    )


def _longce_windows(cfg: FinetuneConfig, trained: int, seq: int) -> tuple[int | None, int | None]:
    """LongCE's short context W (default: the trained length) and stride S (default W/4, the
    reference's ratio: :func:`ctxext.evaluate.short_pass.short_stride`), refused when no
    token of a training sequence would have its context cut (it needs a position >= W + S)."""
    from ctxext.evaluate.short_pass import short_stride

    if cfg.loss != "longce":
        return None, None
    window = cfg.longce_window or trained
    default = "" if cfg.longce_window else f" (default: the trained length {trained})"
    if window >= seq:
        raise CtxextError(
            f"--loss longce: the short window {window}{default} is not shorter than the "
            f"training length {seq}, so no token's context is cut: pass --longce-window "
            f"below {seq} or train longer sequences"
        )
    stride = cfg.longce_stride or short_stride(window)
    if stride > window:
        raise CtxextError(
            f"--longce-stride {stride} exceeds the short window {window}{default}: pass "
            f"--longce-stride at most {window}"
        )
    if window + stride >= seq:
        raise CtxextError(
            f"--loss longce: the short window {window}{default} plus the stride {stride} is "
            f"not shorter than the training length {seq}, so no token's context is cut (a "
            "token is cut from position window + stride on): pass a smaller --longce-window "
            "or --longce-stride, or train longer sequences"
        )
    return window, stride


def check_training_data(
    cfg: FinetuneConfig, config: dict[str, Any], folder: Path, trained: int, seq: int
) -> None:
    """What the samples need, checked from the config and tokenizer.json alone (no torch):
    task sources that fit ``seq`` tokens, a mask for packed task episodes, and short batches
    (:func:`check_short_batches`). Called by the fine-tune's setup and by `ctxext run`'s
    preflight, before the evaluation that precedes the fine-tune."""
    check_tasks_fit(cfg, folder, seq)
    if cfg.tasks.min_length is not None:
        check_episodes_supported(config, seq)
    if cfg.short_fraction:
        check_short_batches(cfg, config, folder, trained, seq)


def check_tasks_fit(
    cfg: FinetuneConfig, folder: Path, length: int, options: TaskOptions | None = None
) -> None:
    """Task sources of the mix that cannot fit ``length`` tokens (with ``options``, default the
    run's task options), refused from the model's tokenizer.json alone (no torch); without
    one, the run checks with the real tokenizer before it reads any data
    (:func:`ctxext.finetune.mix.load_mix`)."""
    tasks = [m.source for m in cfg.mix or () if m.is_task]
    path = folder / "tokenizer.json"
    if not tasks or not path.is_file():
        return
    from ctxext.synthetic import TokenCounter, check_mix_tasks_fit

    check_mix_tasks_fit(TokenCounter(path), tasks, options or cfg.tasks, length)


def check_short_batches(
    cfg: FinetuneConfig, config: dict[str, Any], folder: Path, trained: int, seq: int
) -> None:
    """Refuse short batches (``short_fraction``) that cannot be built: a training length that
    is not longer than the trained length, a mask the model cannot take, or task episodes that
    do not fit the trained length (from tokenizer.json alone, as :func:`check_tasks_fit`)."""
    if seq <= trained:
        raise CtxextError(
            f"--short-fraction packs episodes of at most the trained length {trained}, and the "
            f"training length {seq} is not longer: drop --short-fraction"
        )
    check_episodes_supported(config, trained)
    low = min(cfg.tasks.min_length or trained, trained)
    try:
        check_tasks_fit(cfg, folder, trained, cfg.tasks.model_copy(update={"min_length": low}))
    except CtxextError as exc:
        raise CtxextError(
            f"--short-fraction: short batches hold task episodes of at most "
            f"the trained length {trained}: {exc}"
        ) from None


def _injected_nan_step() -> int | None:
    value = os.environ.get(INJECT_NAN_ENV, "").strip()
    return int(value) if value.isdigit() else None


def _existing_extension(info: Any, name: str) -> tuple[str, float]:
    """Method and factor of a checkpoint `ctxext extend` already wrote (no --method given)."""
    existing = info.existing_scaling
    if existing is None:
        raise CtxextError(
            f"{name} is not extended yet: pass --method and --factor (or --target-length), or a "
            "checkpoint written by `ctxext extend`"
        )
    kind = str(existing.get("rope_type", "default"))
    if kind == "default":  # ctxext's static NTK: theta enlarged, lengths recorded
        return "ntk", existing["max_position_embeddings"] / info.trained_length
    factor = existing.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise CtxextError(
            f"{name} has rope scaling {kind} without a factor > 1; pass the base model with "
            "--method and --factor instead"
        )
    return kind, float(factor)


def _check_output_state(out: Path, work: Path, *, resume: bool, overwrite: bool) -> None:
    """The output/--resume/--overwrite rules, checked before anything is loaded."""
    if resume and overwrite:
        raise CtxextError("--resume and --overwrite exclude each other: pick one")
    if resume:
        if newest_checkpoint(work) is None:
            done = " (the run already finished)" if out.exists() and not work.exists() else ""
            raise CtxextError(
                f"--resume: no complete checkpoint in {work}{done}; start without --resume "
                "(checkpoints are written every --save-every steps)"
            )
        return
    if overwrite:
        return
    if newest_checkpoint(work) is not None:
        raise CtxextError(
            f"an interrupted run of {out} is in {work}: pass --resume to continue it or "
            "--overwrite to start over"
        )
    if out.exists():
        raise CtxextError(
            f"output folder {out} already exists; pass --overwrite to replace it (or --resume "
            "to continue an interrupted run)"
        )


def run_identity(
    setup: RunSetup, cfg: FinetuneConfig, global_batch: int, data_fingerprint: str
) -> dict[str, Any]:
    """What makes a run the same run: a --resume must match it (``state.check_same_run``)."""
    from ctxext import checkpoint

    return {
        "model": str(setup.source.path),
        "config_sha256": checkpoint.config_hash(setup.config_before),
        "extend": setup.extend.model_dump(mode="json") if setup.extend else None,
        "finetune": cfg.identity(),
        "global_batch": global_batch,
        "data_fingerprint": data_fingerprint,
    }
