"""The memory/time check every eval, finetune and run makes first: each command's workloads
(one per length or phase) built from its typed configs, estimated on this machine and set
against the memory available.

The CLI (:mod:`ctxext.cli.guard`) renders the verdict: a plan (``ctxext plan``), a refusal, a
warning under ``--force``, or the estimate of a long run. No torch at import time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ctxext.device import compute_dtype, pick_device
from ctxext.errors import CtxextError

#: Runs predicted to take longer than this print their estimate before starting.
ANNOUNCE_SECONDS = 60.0
#: Without a cached calibration, a run this far below the limits by a pessimistic guess
#: is let through without measuring the machine (a tiny test run should not pay ~30 s).
_GUESS_FRACTION = 0.5

#: status(message) -> a context manager shown while the machine is measured (a spinner).
Status = Callable[[str], contextlib.AbstractContextManager[Any]]


@dataclass
class CommandWorkloads:
    """The workloads of one command (one per length or phase) on one model shape."""

    command: str
    model: str
    shape: Any  # shape.ModelShape
    trained_length: int
    phases: list[tuple[str, Any]] = field(default_factory=list)  # (label, shape.Workload)

    def estimates(self, calib: Any) -> list[tuple[str, Any]]:
        from ctxext.resources.estimate import estimate

        return [(label, estimate(self.shape, work, calib)) for label, work in self.phases]


@dataclass(frozen=True)
class Verdict:
    """A run's estimates against the memory available."""

    run: CommandWorkloads
    rows: list[tuple[str, Any]]  # (label, estimate.Estimate) per phase
    calib: Any  # timing.Calibration
    limit: int
    where: str  # where the limit comes from

    @property
    def peak(self) -> int:
        return max(e.peak for _, e in self.rows)

    @property
    def seconds(self) -> float | None:
        return total_seconds(self.rows)

    @property
    def long(self) -> bool:
        """Unknown or over a minute: worth announcing before it starts."""
        return self.seconds is None or self.seconds > ANNOUNCE_SECONDS

    def refusal(self) -> str | None:
        """Why the run does not fit and the cheapest changes that would; None when it fits."""
        from ctxext.resources.estimate import format_bytes, suggest_changes

        if self.peak <= self.limit:
            return None
        run = self.run
        worst = max(self.rows, key=lambda r: r[1].peak)
        work = dict(run.phases)[worst[0]]
        fixes = suggest_changes(run.shape, work, self.calib, self.limit, run.trained_length)
        fix = f"would fit: {' | '.join(fixes)}" if fixes else "no single change fits"
        return (
            f"{run.command} needs ~{format_bytes(self.peak)} at its peak ({worst[0]}) but "
            f"{format_bytes(self.limit)} is available ({self.where}); {fix}; or pass "
            f"--force (details: ctxext plan {run.command} ...)"
        )


# --------------------------------------------------------------------------- workloads


def finetune_workloads(model: str | None, output: Any, extend: Any, cfg: Any) -> CommandWorkloads:
    """Before `finetune` loads anything: its workload."""
    from ctxext.finetune.setup import setup_run

    # overwrite=True: the output rules are checked by the run itself, not by its guard.
    run = setup_run(model, output, extend, cfg, resume=False, overwrite=True)
    return _finetune_workloads(run.source, run.trained_length, run.seq_length, cfg)


def recipe_workloads(loaded: Any) -> CommandWorkloads:
    """Before `run` does anything slow: its fine-tune and eval phases."""
    from ctxext import checkpoint, locate, rope

    recipe = loaded.recipe
    source = locate.resolve_model(recipe.model)
    info = rope.analyze(checkpoint.read_config(source.path))
    target = info.trained_length
    if recipe.extend is not None:
        ext = recipe.extend
        factor = rope.validate_request(info, ext.method, ext.factor, ext.target_length)
        target = rope.new_length(info.trained_length, factor)
    run = CommandWorkloads("run", source.name, None, info.trained_length)
    if recipe.finetune is not None:
        seq = recipe.finetune.train_length or target
        run = _finetune_workloads(source, info.trained_length, seq, recipe.finetune)
        run.command = "run"
    if recipe.eval is not None:
        ev = eval_workloads([source], recipe.eval, _recipe_eval_tokens(recipe))
        run.shape = ev.shape
        run.phases += ev.phases
    return run


def _recipe_eval_tokens(recipe: Any) -> dict[int, int] | None:
    """Perplexity tokens per length before the data is read: each of eval.num_docs documents
    scores its first L tokens, for every variant (fewer when fewer documents are long
    enough); None without num_docs or with a stride (then the data decides)."""
    cfg = recipe.eval
    if cfg.num_docs is None or cfg.stride is not None:
        return None
    if "ppl" not in cfg.tasks:
        return {}
    return {n: cfg.num_docs * n * len(recipe.variants()) for n in cfg.lengths}


def _finetune_workloads(source: Any, trained: int, seq: int, cfg: Any) -> CommandWorkloads:
    from ctxext import checkpoint
    from ctxext.resources.shape import ModelShape, Workload

    shape = ModelShape.from_config(checkpoint.read_config(source.path))
    compute = compute_dtype(cfg.dtype, pick_device())
    weights = "float32"
    if cfg.lora_rank is not None:  # finetune._load: the frozen base in the compute dtype
        weights = compute
    work = Workload(
        "finetune", seq, batch=cfg.batch_size, compute_dtype=compute, weight_dtype=weights,
        lora_rank=cfg.lora_rank, lora_trainable=tuple(cfg.lora_trainable),
        grad_ckpt=cfg.grad_ckpt, steps=cfg.steps, grad_accum=cfg.grad_accum,
        episodes=cfg.tasks.min_length is not None or cfg.short_fraction > 0,
    )  # fmt: skip
    label = f"finetune {seq:,} tokens x {cfg.steps} steps"
    return CommandWorkloads("finetune", source.name, shape, trained, [(label, work)])


def eval_workloads(sources: list[Any], cfg: Any, tokens: dict[int, int] | None) -> CommandWorkloads:
    """One workload per length, on the largest of the models (resolved already:
    ``locate.ResolvedModel``s), the one that decides the peak."""
    from ctxext import checkpoint, rope
    from ctxext.resources.shape import ModelShape, Workload

    configs = [checkpoint.read_config(src.path) for src in sources]
    shapes = [ModelShape.from_config(c) for c in configs]
    biggest = max(range(len(shapes)), key=lambda i: shapes[i].total_params())
    dtype = compute_dtype(cfg.dtype, pick_device())
    phases = []
    for n in cfg.lengths:
        work = Workload(
            "eval", n, compute_dtype=dtype, weight_dtype=dtype,
            tokens=None if tokens is None else tokens.get(n, 0),
            device_map_auto=cfg.device_map == "auto",
        )  # fmt: skip
        phases.append((f"eval {n:,} tokens", work))
    trained = rope.analyze(configs[biggest]).trained_length
    return CommandWorkloads("eval", sources[biggest].name, shapes[biggest], trained, phases)


def eval_tokens(
    sources: list[Any], cfg: Any, token_cache: dict[str, Any], per_model: int
) -> dict[int, int]:
    """Tokens every length feeds, over all models (``locate.ResolvedModel``s) and variants
    (as the progress bar counts)."""
    from ctxext.evaluate.protocol import planned_tokens

    out: dict[int, int] = {}
    if "ppl" not in cfg.tasks:
        return out
    for source in sources:
        tokens = token_cache[str(source.path)]  # evaluate.run._Tokens
        ids, bos = tokens.docs.ids, tokens.bos_token_id
        for n in cfg.lengths:
            count = planned_tokens(
                ids, n, bos_token_id=bos, stride=cfg.stride, num_docs=cfg.num_docs, seed=cfg.seed
            )
            out[n] = out.get(n, 0) + count * per_model
    return out


# --------------------------------------------------------------------------- the verdict


def assess(
    run: CommandWorkloads,
    memory_limit: str | None,
    measure: bool,
    status: Status | None = None,
    recalibrate: bool = False,
) -> Verdict:
    """The run's estimates against the limit (``memory_limit``, else the memory available);
    ``measure``: calibrate this machine if no calibration is cached (``ctxext plan``);
    ``recalibrate``: measure it again now, whatever is cached (``--recalibrate``)."""
    from ctxext.resources import calibrate

    limit, where = _limit(memory_limit)
    status = status or (lambda _: contextlib.nullcontext())
    if recalibrate and calibrate.launched_rank() in (None, 0):
        with status("measuring this machine again (--recalibrate; ~30 s)"):
            calib = calibrate.load_calibration(refresh=True)
    else:
        calib = _calibration(run, limit, measure, status)
    return Verdict(run, run.estimates(calib), calib, limit, where)


def _limit(memory_limit: str | None) -> tuple[int, str]:
    from ctxext.resources import calibrate
    from ctxext.resources.estimate import parse_bytes

    if memory_limit is not None:
        try:
            return parse_bytes(memory_limit), "--memory-limit"
        except ValueError as e:
            raise CtxextError(f"--memory-limit: {e}") from None
    return calibrate.available_memory(pick_device())


def _calibration(run: CommandWorkloads, limit: int, measure: bool, status: Status) -> Any:
    """The cached calibration; else a pessimistic guess, measured only if the guess is close."""
    from ctxext.resources import calibrate

    cached = calibrate.cached_calibration()
    if cached is not None:
        return cached
    if calibrate.launched_rank() not in (None, 0):
        # Rank 0 measures (its check is the one that decides and prints); another rank measuring
        # at the same time would slow both measurements and the run's start.
        return calibrate.PESSIMISTIC
    if not measure:
        rows = run.estimates(calibrate.PESSIMISTIC)
        seconds = total_seconds(rows)
        peak = max(e.peak for _, e in rows)
        if seconds is not None and seconds <= ANNOUNCE_SECONDS and peak <= _GUESS_FRACTION * limit:
            return calibrate.PESSIMISTIC
    with status("measuring this machine once (matmul, attention, memory; ~30 s)"):
        return calibrate.load_calibration()


def total_seconds(rows: list[tuple[str, Any]]) -> float | None:
    if any(e.seconds is None for _, e in rows):
        return None
    return sum(e.seconds for _, e in rows)


# --------------------------------------------------------------------------- the first steps


#: Steps a fine-tune times against the calibration's prediction, after one untimed warm-up.
CHECK_STEPS = 2
#: Off by more than this factor (either way): the calibration is checked.
CHECK_FACTOR = 2.0


@dataclass
class StepCheck:
    """A fine-tune's first real steps against what the cached calibration predicted for them.

    Steps more than :data:`CHECK_FACTOR` faster than predicted: the calibration is stale (e.g.
    measured on a busy machine): the speeds are measured again now and cached. More than that
    slower: measured again too, unless the machine is busier now than when it was measured (the
    load, not the calibration, explains it; the cache keeps the quieter measurement). Measured
    under a load like now's (fair shares within 1.5x): the speeds stand and the estimate is
    what is off for this workload, so nothing is measured again. Either way one line says so. Checked once, after the warm-up step and :data:`CHECK_STEPS` more.
    """

    predict: Callable[[Any], float]  # calibration -> seconds per optimizer step
    calib: Any  # timing.Calibration
    seconds: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def predicted(self) -> float:
        return self.predict(self.calib)

    def observe(self, seconds: float) -> tuple[str, str] | None:
        """Record one step's seconds; once enough are in: (event, one-line message) or None."""
        if self.done:
            return None
        self.seconds.append(seconds)
        if len(self.seconds) < 1 + CHECK_STEPS:
            return None
        self.done = True
        measured = sum(self.seconds[1:]) / CHECK_STEPS
        ratio = measured / self.predicted
        if 1 / CHECK_FACTOR <= ratio <= CHECK_FACTOR:
            return None
        return self._react(measured, ratio)

    def _react(self, measured: float, ratio: float) -> tuple[str, str]:
        from ctxext.resources import calibrate
        from ctxext.resources.threads import MachineLoad, machine_load

        said = (
            f"the cached calibration of this machine predicted {self.predicted:.3g} s per step, "
            f"the steps take {measured:.3g} s"
        )
        now = machine_load()
        then = self.calib.load
        if now is not None and then is not None:
            # The fair share of the cores then and now: the calibration can only be stale if
            # the load it was measured under differs from today's.
            share = now.slowdown / MachineLoad(then, now.cores, now.threads).slowdown
            if ratio > CHECK_FACTOR and share >= 1.5:
                return "status", (
                    f"{said}: the machine is busier now (load {now.average:.1f} on {now.cores} "
                    f"cores; {then:.1f} when measured), calibration kept"
                )
            if 1 / 1.5 < share < 1.5:
                # Measured under a load like now's: measuring again would give the same speeds
                # (and cost seconds on every run of this workload); the estimate is what is off.
                return "status", (
                    f"{said} (measured at load {then:.1f}; now {now.average:.1f}): the estimate "
                    "is off for this run, not the speeds; calibration kept"
                )
        fresh = calibrate.measure_speed(self.calib)
        calibrate.save_calibration(fresh)
        when = ""
        if then is not None and fresh.load is not None:
            when = f" (measured at load {then:.1f}; now {fresh.load:.1f})"
        again = self.predict(fresh)
        off = ""
        if not 1 / CHECK_FACTOR <= measured / again <= CHECK_FACTOR:
            off = (
                f"; it now predicts {again:.3g} s: the estimate is off for this run, not the speeds"
            )
        return "warning", f"{said}{when}: re-measured the speeds, cache updated{off}"


def finetune_step_check(source: Any, trained: int, seq: int, cfg: Any) -> StepCheck | None:
    """The check of a fine-tune's first steps, when a calibration is cached (None otherwise:
    nothing to check). ``source``: the resolved model."""
    from ctxext.resources import calibrate

    cached = calibrate.cached_calibration()
    if cached is None:
        return None
    run = _finetune_workloads(source, trained, seq, cfg)
    return StepCheck(lambda calib: run.estimates(calib)[0][1].seconds_per_step, cached)
