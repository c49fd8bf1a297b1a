"""`ctxext plan COMMAND ...` and the memory/time check every eval, finetune and run makes first.

`ctxext plan eval|finetune|run ARGS` runs the command's own parsing and validation (so it
accepts exactly the command's arguments) with a hidden ``--plan-only`` flag: the command stops
where it would load weights and prints the estimate instead. Without that flag the same
estimate guards the run: printed when it will take more than a minute, and a run whose peak
exceeds the memory available (``--memory-limit``, ``$CTXEXT_MEMORY_LIMIT``, else free RAM or
free GPU memory) is refused with one line naming the cheapest changes that would fit, unless
``--force``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.console import Console

from ctxext.errors import CtxextError

__all__ = [
    "Announcement",
    "GuardOptions",
    "RunPlan",
    "check_eval",
    "check_finetune",
    "check_recipe",
    "plan",
]

_out = Console()
_err = Console(stderr=True)
#: Runs predicted to take longer than this print their estimate before starting.
ANNOUNCE_SECONDS = 60.0
#: Without a cached calibration, a run this far below the limits by a pessimistic guess
#: is let through without measuring the machine (a tiny test run should not pay ~30 s).
_GUESS_FRACTION = 0.5


@dataclass(frozen=True)
class GuardOptions:
    """The flags every guarded command shares."""

    force: bool = False
    memory_limit: str | None = None
    plan_only: bool = False
    as_json: bool = False


@dataclass
class Announcement:
    """The estimate of a long run, printed once, when the work starts (after every cheap check
    and the model load, so that a bad input still fails with its one line)."""

    table: Any = None

    def show(self, console: Any) -> None:
        if self.table is not None:
            console.print(self.table)
            self.table = None


@dataclass
class RunPlan:
    """The workloads of one command (one per length or phase) on one model shape."""

    command: str
    model: str
    shape: Any  # plan.ModelShape
    trained_length: int
    phases: list[tuple[str, Any]] = field(default_factory=list)  # (label, plan.Workload)

    def estimates(self, calib: Any) -> list[tuple[str, Any]]:
        from ctxext.plan import estimate

        return [(label, estimate(self.shape, work, calib)) for label, work in self.phases]


# --------------------------------------------------------------------------- the commands


def plan(
    ctx: typer.Context,
    command: Annotated[str, typer.Argument(help="eval, finetune or run.", show_default=False)],
) -> None:
    """Print the memory and time COMMAND would need, without loading weights.

    Takes exactly the arguments of `ctxext eval`, `ctxext finetune` or `ctxext run`, e.g.
    `ctxext plan finetune -o out -m yarn -t 32768 --lora-rank 16 --grad-ckpt`.
    """
    if command not in ("eval", "finetune", "run"):
        raise CtxextError(f"plan: unknown command '{command}'; use eval, finetune or run")
    from ctxext.cli import _run_app

    raise typer.Exit(_run_app([command, *ctx.args, "--plan-only"]))


def check_finetune(
    model: str | None, output: Any, extend: Any, cfg: Any, opts: GuardOptions
) -> Announcement:
    """Before `finetune` loads anything: its workload against this machine."""
    from ctxext.finetune.plan import plan_run

    # overwrite=True: the output rules are checked by the run itself, not by its plan.
    run = plan_run(model, output, extend, cfg, resume=False, overwrite=True)
    return _decide(_finetune_plan(run.source, run.trained_length, run.seq_length, cfg), opts)


def check_recipe(loaded: Any, opts: GuardOptions) -> Announcement:
    """Before `run` does anything slow: its fine-tune and eval phases against this machine."""
    from ctxext import checkpoint, rope

    recipe = loaded.recipe
    source = checkpoint.resolve_model(recipe.model)
    info = rope.analyze(checkpoint.read_config(source.path))
    target = info.trained_length
    if recipe.extend is not None:
        ext = recipe.extend
        factor = rope.validate_request(info, ext.method, ext.factor, ext.target_length)
        target = round(info.trained_length * factor)
    run = RunPlan("run", source.name, None, info.trained_length)
    if recipe.finetune is not None:
        seq = recipe.finetune.train_length or target
        run = _finetune_plan(source, info.trained_length, seq, recipe.finetune)
        run.command = "run"
    if recipe.eval is not None:
        ev = _eval_plan([recipe.model], recipe.eval, None)
        run.shape = ev.shape
        run.phases += [(f"eval {label}", w) for label, w in ev.phases]
    return _decide(run, opts) if run.phases else Announcement()


def check_eval(
    models: list[str | None],
    cfg: Any,
    opts: GuardOptions,
    variants_per_model: int,
    announce: Announcement,
) -> Callable[[dict[str, Any]], None]:
    """The check `run_eval` makes once the data is tokenized (the token counts give the time),
    before any model is loaded; a long run's estimate goes to ``announce``."""

    def preflight(token_cache: dict[str, Any]) -> None:
        tokens = _eval_tokens(models, cfg, token_cache, variants_per_model)
        announce.table = _decide(_eval_plan(models, cfg, tokens), opts).table

    return preflight


# --------------------------------------------------------------------------- workloads


def _finetune_plan(source: Any, trained: int, seq: int, cfg: Any) -> RunPlan:
    from ctxext import checkpoint
    from ctxext.plan import ModelShape, Workload

    shape = ModelShape.from_config(checkpoint.read_config(source.path))
    cuda = _device().startswith("cuda")
    compute = "bfloat16" if cuda and cfg.dtype == "auto" else _fp(cfg.dtype)
    weights = "float32"
    if cfg.lora_rank is not None:  # finetune._load: the frozen base in the compute dtype
        weights = compute
    work = Workload(
        "finetune", seq, batch=cfg.batch_size, compute_dtype=compute, weight_dtype=weights,
        lora_rank=cfg.lora_rank, lora_trainable=tuple(cfg.lora_trainable),
        grad_ckpt=cfg.grad_ckpt, steps=cfg.steps, grad_accum=cfg.grad_accum,
    )  # fmt: skip
    label = f"finetune {seq:,} tokens x {cfg.steps} steps"
    return RunPlan("finetune", source.name, shape, trained, [(label, work)])


def _eval_plan(models: list[str | None], cfg: Any, tokens: dict[int, int] | None) -> RunPlan:
    """One workload per length, on the largest of the models (the one that decides the peak)."""
    from ctxext import checkpoint, rope
    from ctxext.plan import ModelShape, Workload

    configs = [checkpoint.read_config(checkpoint.resolve_model(m).path) for m in models]
    shapes = [ModelShape.from_config(c) for c in configs]
    biggest = max(range(len(shapes)), key=lambda i: shapes[i].total_params())
    cuda = _device().startswith("cuda")
    dtype = "bfloat16" if cuda and cfg.dtype == "auto" else _fp(cfg.dtype)
    phases = []
    for n in cfg.lengths:
        work = Workload(
            "eval", n, compute_dtype=dtype, weight_dtype=dtype,
            tokens=None if tokens is None else tokens.get(n, 0),
            device_map_auto=cfg.device_map == "auto",
        )  # fmt: skip
        phases.append((f"eval {n:,} tokens", work))
    trained = rope.analyze(configs[biggest]).trained_length
    name = checkpoint.resolve_model(models[biggest]).name
    return RunPlan("eval", name, shapes[biggest], trained, phases)


def _eval_tokens(
    models: list[str | None], cfg: Any, token_cache: dict[str, Any], per_model: int
) -> dict[int, int]:
    """Tokens every length feeds, over all models and variants (as the progress bar counts)."""
    from ctxext import checkpoint, evaluate

    out: dict[int, int] = {}
    if "ppl" not in cfg.tasks:
        return out
    for model in models:
        tokens = token_cache[str(checkpoint.resolve_model(model).path)]  # evalrun's _Tokens
        ids, bos = tokens.docs.ids, tokens.bos_token_id
        for n in cfg.lengths:
            count = evaluate.planned_tokens(
                ids, n, bos_token_id=bos, stride=cfg.stride, num_docs=cfg.num_docs, seed=cfg.seed
            )
            out[n] = out.get(n, 0) + count * per_model
    return out


def _fp(dtype: str) -> str:
    return "float32" if dtype == "auto" else dtype


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- the decision


def _decide(run: RunPlan, opts: GuardOptions) -> Announcement:
    """Print the plan (plan-only), refuse an over-budget run, or announce a long one."""
    from ctxext import plan

    limit, where = _limit(opts)
    calib = _calibration(run, limit, measure=opts.plan_only)
    rows = run.estimates(calib)
    peak = max(e.peak for _, e in rows)
    seconds = _total_seconds(rows)
    if opts.plan_only:
        _print_plan(run, rows, calib, limit, where, opts.as_json)
        raise typer.Exit(0)
    if peak > limit:
        worst = max(rows, key=lambda r: r[1].peak)
        work = dict(run.phases)[worst[0]]
        fixes = plan.suggest_changes(run.shape, work, calib, limit, run.trained_length)
        fix = f"would fit: {' | '.join(fixes)}" if fixes else "no single change fits"
        message = (
            f"{run.command} needs ~{plan.format_bytes(peak)} at its peak ({worst[0]}) but "
            f"{plan.format_bytes(limit)} is available ({where}); {fix}; or pass --force "
            f"(details: ctxext plan {run.command} ...)"
        )
        if not opts.force:
            raise CtxextError(message)
        _err.print(f"[yellow]warning:[/yellow] {message} (--force: running anyway)", soft_wrap=True)
    if seconds is None or seconds > ANNOUNCE_SECONDS:
        return Announcement(_table(run, rows, calib, limit, where))
    return Announcement()


def _limit(opts: GuardOptions) -> tuple[int, str]:
    from ctxext import calibrate, plan

    if opts.memory_limit is not None:
        try:
            return plan.parse_bytes(opts.memory_limit), "--memory-limit"
        except ValueError as e:
            raise CtxextError(f"--memory-limit: {e}") from None
    return calibrate.available_memory(_device())


def _calibration(run: RunPlan, limit: int, measure: bool) -> Any:
    """The cached calibration; else a pessimistic guess, measured only if the guess is close."""
    from ctxext import calibrate

    cached = calibrate.cached_calibration()
    if cached is not None:
        return cached
    if not measure:
        rows = run.estimates(calibrate.PESSIMISTIC)
        seconds = _total_seconds(rows)
        peak = max(e.peak for _, e in rows)
        if seconds is not None and seconds <= ANNOUNCE_SECONDS and peak <= _GUESS_FRACTION * limit:
            return calibrate.PESSIMISTIC
    with _err.status("measuring this machine once (matmul, attention, memory; ~30 s)"):
        return calibrate.load_calibration()


def _total_seconds(rows: list[tuple[str, Any]]) -> float | None:
    if any(e.seconds is None for _, e in rows):
        return None
    return sum(e.seconds for _, e in rows)


# --------------------------------------------------------------------------- rendering


def _print_plan(
    run: RunPlan, rows: list[tuple[str, Any]], calib: Any, limit: int, where: str, as_json: bool
) -> None:
    from ctxext import plan

    peak = max(e.peak for _, e in rows)
    verdict = "fits" if peak <= limit else "does not fit"
    if as_json:
        _out.print_json(
            data={
                "command": run.command,
                "model": run.model,
                "device": calib.device,
                "phases": [{"label": label, **e.to_dict()} for label, e in rows],
                "peak": peak,
                "seconds": _total_seconds(rows),
                "limit": limit,
                "limit_source": where,
                "fits": peak <= limit,
            }
        )
        return
    _out.print(_table(run, rows, calib, limit, where))
    _out.print(f"peak {plan.format_bytes(peak)}: {verdict} in {plan.format_bytes(limit)} ({where})")


def _table(run: RunPlan, rows: list[tuple[str, Any]], calib: Any, limit: int, where: str) -> Any:
    """Components down, phases (lengths) across."""
    from rich.table import Table

    from ctxext.plan import format_bytes

    e0 = rows[0][1]
    table = Table(
        title=f"ctxext plan {run.command}: {run.model} on {calib.device}",
        caption=f"peak = runtime + weights + optimizer + max(gradients, activations + attention "
        f"+ loss); limit {format_bytes(limit)} ({where})",
    )
    table.add_column("")
    for label, _ in rows:
        table.add_column(label, justify="right")
    table.add_row("parameters", *(f"{e.params_total:,}" for _, e in rows))
    table.add_row("trainable", *(f"{e.params_trainable:,}" for _, e in rows))
    works = [w for _, w in run.phases]
    training = e0.params_trainable > 0
    memory = [("runtime (Python, torch, libraries)", "runtime"), ("weights", "weights")]
    if training:
        memory += [("optimizer state", "optimizer"), ("gradients", "gradients")]
    for name, key in memory:
        table.add_row(name, *(format_bytes(getattr(e, key)) for _, e in rows))
    if training:
        on = [
            e.activations if w.grad_ckpt else e.activations_other
            for (_, e), w in zip(rows, works, strict=True)
        ]
        off = [
            e.activations_other if w.grad_ckpt else e.activations
            for (_, e), w in zip(rows, works, strict=True)
        ]
        mark = ["*" if w.grad_ckpt else "" for w in works]
        table.add_row(
            "activations, grad ckpt",
            *(f"{format_bytes(x)}{m}" for x, m in zip(on, mark, strict=True)),
        )
        mark = ["" if w.grad_ckpt else "*" for w in works]
        table.add_row(
            "activations, no grad ckpt",
            *(f"{format_bytes(x)}{m}" for x, m in zip(off, mark, strict=True)),
        )
    else:
        table.add_row("activations", *(format_bytes(e.activations) for _, e in rows))
    table.add_row("attention", *(format_bytes(e.attention) for _, e in rows))
    table.add_row("loss (logits)", *(format_bytes(e.loss) for _, e in rows))
    table.add_row("[bold]peak[/bold]", *(f"[bold]{format_bytes(e.peak)}[/bold]" for _, e in rows))
    step = "time per step" if training else "time per forward"
    table.add_row(step, *(_duration(e.seconds_per_step) for _, e in rows))
    table.add_row("time per token", *(f"{e.seconds_per_token * 1e3:.3g} ms" for _, e in rows))
    table.add_row("time", *("?" if e.seconds is None else _duration(e.seconds) for _, e in rows))
    total = _total_seconds(rows)
    table.add_row("[bold]total time[/bold]", "unknown" if total is None else _duration(total))
    return table


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
