"""The run: data, model, Accelerate, the optimizer-step loop, and the summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxext.config import ExtendConfig, FinetuneConfig
from ctxext.errors import CtxextError
from ctxext.finetune.episodes import isolated_batches, mask_dtype
from ctxext.finetune.export import finish
from ctxext.finetune.loss import LONGCE_MAX_WEIGHT
from ctxext.finetune.model import prepare_model
from ctxext.finetune.parallel import (
    accelerator_precision,
    check_context_parallel_device,
    check_parallelism,
    data_parallel_size,
    fsdp_mode,
    mixed_precision,
    model_inputs,
    prepare,
)
from ctxext.finetune.samples import load_train_data, train_loader
from ctxext.finetune.setup import RunSetup, run_identity, setup_run
from ctxext.finetune.state import (
    LOG_FILE,
    STATE_FILE,
    ProgressFn,
    TrainerState,
    check_same_run,
    create_work_dir,
    newest_checkpoint,
    newest_intact_checkpoint,
    save_checkpoint,
    trim_log,
)


class TrainingDiverged(CtxextError):
    """A non-finite loss or gradient norm: the run stops (exit code 1), checkpoints intact."""

    exit_code = 1


class _NonFinite(Exception):
    def __init__(self, what: str, value: float) -> None:
        super().__init__(what)
        self.what, self.value = what, value


def run_finetune(
    model: str | None,
    output: Path,
    extend: ExtendConfig | None,
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    budget_check: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` at the extended length and write a merged checkpoint to ``output``.

    Under ``accelerate launch`` every process runs this; they train data-parallel and only the
    main process writes files. Returns the summary (the same on every process).
    ``budget_check()`` (the CLI's memory/time check) runs once the cheap checks have passed,
    before torch is imported.
    """
    setup = setup_run(model, output, extend, cfg, resume=resume, overwrite=overwrite)
    if budget_check is not None:
        budget_check()
    from accelerate import Accelerator  # only now: a refused request never waits for torch

    from ctxext import locate
    from ctxext.device import pick_device
    from ctxext.modeling import load_tokenizer

    device = pick_device()
    check_context_parallel_device(device)  # before Accelerate, which refuses it with a traceback
    accelerator_precision(mixed_precision(cfg.dtype, device))
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=mixed_precision(cfg.dtype, device),
        step_scheduler_with_optimizer=False,  # else it steps once per process per step
        # Without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) must
        # be told they are CPU workers to join one gloo group (MULTI_CPU) instead of each
        # training alone.
        cpu=device == "cpu",
    )
    report = _reporter(progress, acc.is_main_process)
    if setup.extend is not None:  # what other engines do differently, as `extend` says
        from ctxext.extend import engine_warnings

        for note in engine_warnings(setup.extend, setup.trained_length, setup.target_length):
            report("warning", {"message": note})
    global_batch = cfg.batch_size * cfg.grad_accum * data_parallel_size(acc)
    check_parallelism(acc, setup.seq_length, cfg.loss)
    # Data first: a source too small for one batch is reported before any weight is loaded.
    report("status", {"message": "packing training data"})
    setup.source = locate.fetch(setup.source, "tokenizer")  # a Hub model: no weights yet
    tokenizer = load_tokenizer(setup.source.path, trust_remote_code)
    # PoSE windows are cut from target-length chunks; plain training reads whole chunks.
    chunk_length = setup.target_length if cfg.pose else setup.seq_length
    data = load_train_data(tokenizer, cfg, chunk_length, global_batch, _pack_reporter(report))
    identity = run_identity(setup, cfg, global_batch, data.fingerprint)
    if resume:
        check_same_run(setup.work, identity)
    report("status", {"message": f"loading {setup.source.name}"})
    loaded, lm = _load(setup, cfg, trust_remote_code, allow_pickle, report)
    net, trainable, total = prepare_model(lm, cfg)
    state = TrainerState()
    ckpt = newest_intact_checkpoint(setup.work, report) if resume else None
    if ckpt is not None:
        state = TrainerState(**json.loads((ckpt / STATE_FILE).read_text()))
        state.resumed_from = state.step
    loader = train_loader(data, cfg, setup, state.samples, global_batch)
    net, opt, loader, sched = prepare(acc, net, loader, cfg)
    if not resume:  # only now: a run that fails to start leaves nothing behind
        create_work_dir(acc, setup.work, setup.out, identity)
    if ckpt is not None:
        report("status", {"message": f"resuming from {ckpt.name}"})
        acc.load_state(str(ckpt))
    if acc.is_main_process:
        trim_log(setup.work / LOG_FILE, state.step)

    summary_base = {
        "output": str(setup.out),
        "method": setup.method,
        "factor": setup.factor,
        "trained_length": setup.trained_length,
        "target_length": setup.target_length,
        "train_length": setup.seq_length,
        "pose": cfg.pose,
        "lora_rank": cfg.lora_rank,
        "global_batch": global_batch,
        "warmup_steps": cfg.warmup(),
        "num_processes": acc.num_processes,
        "data_parallel_size": data_parallel_size(acc),
        "fsdp": fsdp_mode(acc),
        "trainable_parameters": trainable,
        "parameters": total,
        "data": data.summary(),
    }
    if getattr(lm.config, "router_aux_loss_coef", None) is not None:  # MoE: said once
        summary_base["router_aux_loss"] = (
            "not added: the loss is the language-modelling loss only, as the model's own with "
            "output_router_logits false; routers are trained by it alone"
        )
    if cfg.loss == "longce":
        summary_base["loss"] = {
            "name": "longce",
            "window": setup.longce_window,
            "stride": setup.longce_stride,
            "max_weight": LONGCE_MAX_WEIGHT,
        }
    report("start", {"total": cfg.steps, "completed": state.step})
    loss_fn = _loss_function(acc, net, cfg, setup)
    check = None
    if acc.num_processes == 1:  # the calibration predicts one process's step
        from ctxext.resources.guard import finetune_step_check

        check = finetune_step_check(setup.source, setup.trained_length, setup.seq_length, cfg)
    last_loss = _train(
        acc, net, opt, sched, loader, state, cfg, setup, global_batch, report, loss_fn, check
    )
    summary = {
        **summary_base,
        "steps": cfg.steps,
        "resumed_from_step": state.resumed_from,
        "final_loss": last_loss,
        "tokens": state.tokens,
        "seconds": round(state.elapsed, 2),
        "tokens_per_s": round(state.tokens / state.elapsed, 1) if state.elapsed else None,
    }
    report("status", {"message": f"writing {setup.out}"})
    finish(acc, net, loaded, setup, cfg, summary)
    return summary


def _reporter(progress: ProgressFn | None, main: bool) -> ProgressFn:
    def report(event: str, info: dict[str, Any]) -> None:
        if progress is not None and main:
            progress(event, info)

    return report


def _pack_reporter(report: ProgressFn) -> Callable[[str, int, int], None]:
    """Data packing as "packing" events {source, done, total} (tokens)."""

    def packing(source: str, done: int, total: int) -> None:
        report("packing", {"source": source, "done": done, "total": total})

    return packing


def _load(
    setup: RunSetup,
    cfg: FinetuneConfig,
    trust_remote_code: bool,
    allow_pickle: bool,
    report: ProgressFn,
):
    """Load with the extension applied in memory. Full fine-tunes keep fp32 master weights;
    LoRA keeps the frozen base in the compute dtype (peft keeps adapters in fp32)."""
    from ctxext import locate
    from ctxext.device import compute_dtype, pick_device
    from ctxext.modeling import load_causal_lm

    setup.source = locate.fetch(
        setup.source, "weights", allow_pickle=allow_pickle, progress=_download_status(report)
    )
    dtype = "float32" if cfg.lora_rank is None else compute_dtype(cfg.dtype, pick_device())
    loaded = load_causal_lm(
        str(setup.source.path),
        extend=setup.extend,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        attn_implementation=cfg.attn_implementation,
    )
    return loaded, loaded.model


def _download_status(report: ProgressFn) -> Callable[[str, int], Callable[[int], None]]:
    """Weight downloads as "status" events (the CLI shows them in its spinner line)."""

    def bar(what: str, total: int) -> Callable[[int], None]:
        def update(done: int) -> None:
            message = f"{what}: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB"
            report("status", {"message": message})

        return update

    return bar


LossFn = Callable[[dict[str, Any]], tuple[Any, float | None]]


def _loss_function(acc: Any, net: Any, cfg: FinetuneConfig, setup: RunSetup) -> LossFn:
    """inputs -> (the loss to minimise, its plain CE when that is another number)."""
    if cfg.loss == "ce":
        return lambda inputs: (net(**inputs).loss, None)
    from ctxext.finetune.loss import longce_loss

    model = acc.unwrap_model(net)  # the short pass calls the decoder directly, under no_grad

    def longce(inputs: dict[str, Any]) -> tuple[Any, float | None]:
        window, stride = setup.longce_window, setup.longce_stride
        return longce_loss(net, model, inputs, window, stride, acc.autocast())

    return longce


def _train(
    acc: Any,
    net: Any,
    opt: Any,
    sched: Any,
    loader: Any,
    state: TrainerState,
    cfg: FinetuneConfig,
    setup: RunSetup,
    global_batch: int,
    report: ProgressFn,
    loss_fn: LossFn,
    check: Any = None,
) -> float | None:
    """The optimizer-step loop; returns the last step's loss (mean over the global batch).
    ``check``: a :class:`~ctxext.resources.guard.StepCheck` of the first steps (its time, when
    it measures the machine again, is not counted as training time)."""
    tokens_per_step = global_batch * setup.seq_length
    started, tokens_at_start, elapsed_at_start = time.perf_counter(), state.tokens, state.elapsed
    # Task episodes (--task-min-length): each batch gets its explicit block mask here.
    batches = isolated_batches(iter(loader), acc.unwrap_model(net), mask_dtype(acc.mixed_precision))
    loss_value = None
    log = (setup.work / LOG_FILE).open("a", encoding="utf-8") if acc.is_main_process else None
    try:
        while state.step < cfg.steps:
            step_started = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            poison = setup.nan_at_step == state.step + 1
            try:
                loss_value, grad_norm, ce = _one_step(
                    acc, net, opt, sched, batches, cfg, poison, loss_fn
                )
            except _NonFinite as e:
                raise _diverged(setup.work, state.step + 1, e) from None
            state.step += 1
            state.samples += global_batch
            state.tokens += tokens_per_step
            run_time = time.perf_counter() - started
            state.elapsed = elapsed_at_start + run_time
            record = {
                "step": state.step,
                "loss": round(loss_value, 6),
                "grad_norm": round(grad_norm, 6),
                "lr": lr,
                "tokens": state.tokens,
                "tokens_per_s": round((state.tokens - tokens_at_start) / max(run_time, 1e-9), 1),
                "elapsed": round(state.elapsed, 3),
            }
            if ce is not None:  # LongCE: the plain cross-entropy of the same step, beside it
                record["ce"] = round(ce, 6)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            report("step", record)
            if check is not None:
                checked = time.perf_counter()
                said = check.observe(checked - step_started)
                if said is not None:
                    report(said[0], {"message": said[1]})
                started += time.perf_counter() - checked
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.steps:
                path = save_checkpoint(acc, setup.work, state)
                report("checkpoint", {"step": state.step, "path": str(path)})
    finally:
        if log is not None:
            log.close()
    return loss_value


def _one_step(
    acc: Any,
    net: Any,
    opt: Any,
    sched: Any,
    batches: Any,
    cfg: FinetuneConfig,
    poison: bool,
    loss_fn: LossFn,
) -> tuple[float, float, float | None]:
    """grad_accum micro-steps and one optimizer step; returns the loss averaged over all
    processes, the global gradient norm before clipping, and (LongCE) the mean plain CE.

    Both are checked before the optimizer steps: a non-finite one raises _NonFinite and the
    weights, optimizer state and schedule stay as the previous step left them.
    """
    total, ce_total = 0.0, 0.0
    mean, norm, ce_mean = math.nan, math.nan, None
    for _ in range(cfg.grad_accum):
        inputs, context = model_inputs(acc, next(batches))
        with acc.accumulate(net), context:
            loss, ce = loss_fn(inputs)
            if ce is not None:
                ce_total += ce
            if poison:  # fault injection: a real NaN, through the real backward pass
                loss = loss * math.nan
            acc.backward(loss)
            if acc.sync_gradients:
                step_loss = (total + loss.detach()) / cfg.grad_accum
                mean = acc.reduce(step_loss, reduction="mean").item()
                if ce is not None:
                    ce_mean = acc.reduce(_tensor(ce_total / cfg.grad_accum, loss), "mean").item()
                # max_norm=inf measures the norm without scaling the gradients.
                limit = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
                norm = float(acc.clip_grad_norm_(net.parameters(), limit))
                for what, value in (("loss", mean), ("gradient norm", norm)):
                    if not math.isfinite(value):
                        raise _NonFinite(what, value)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
        total = total + loss.detach()
    return mean, norm, ce_mean


def _tensor(value: float, like: Any) -> Any:
    import torch

    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _diverged(work: Path, step: int, e: _NonFinite) -> TrainingDiverged:
    last = newest_checkpoint(work)
    where = (
        f"the last complete checkpoint is {last} (continue with --resume)"
        if last is not None
        else "no checkpoint was written yet (--save-every)"
    )
    return TrainingDiverged(
        f"training diverged at step {step}: the {e.what} is {e.value}; that step was not "
        f"applied and the run stopped; {where}, or start over with a lower --lr or "
        "--max-grad-norm (--overwrite)"
    )
