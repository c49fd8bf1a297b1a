"""Running a validated recipe: preflight, extend / fine-tune / eval stages, outputs written
atomically under a seed."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctxext.config import ExtendConfig
from ctxext.errors import CtxextError
from ctxext.recipes.loader import LoadedRecipe
from ctxext.recipes.provenance import card_info, provenance
from ctxext.recipes.render import render_report
from ctxext.recipes.schema import Recipe
from ctxext.rope.methods import ALL_METHODS


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels; restore after.

    Restoring matters for in-process use (tests, notebooks): a recipe run leaves the caller's
    random state as it found it.
    """
    import numpy as np
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # warn_only: an op without a deterministic kernel (some CUDA ops) warns instead of failing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@dataclass
class RunHooks:
    """How a run reports progress (the CLI renders these with Rich)."""

    status: Callable[[str], None] = lambda message: None
    warning: Callable[[str], None] = lambda message: None
    finetune: Callable[[str, dict[str, Any]], None] | None = None
    eval_factory: Callable[[str, int], Callable[[int], None]] | None = None


@dataclass
class _Preflight:
    source: Any  # locate.ResolvedModel
    name: str  # short display name of the base model
    config: dict[str, Any]
    trained_length: int
    factor: float | None
    new_length: int | None
    notes: list[str]  # what other engines do differently with the extension (as `extend` says)


def preflight(recipe: Recipe) -> _Preflight:
    """Resolve the model and check the extension and the fine-tune's task sources against its
    config and tokenizer (nothing heavy: the CLI calls it before its resource check)."""
    from ctxext import checkpoint, locate, rope
    from ctxext.extend import engine_warnings

    source = locate.resolve_model(recipe.model)
    config = checkpoint.read_config(source.path)
    info = rope.analyze(config)
    factor = new_length = None
    notes: list[str] = []
    if recipe.extend is not None:
        spec = recipe.extend
        factor = rope.validate_request(info, spec.method, spec.factor, spec.target_length)
        rope.extend_config(config, spec.method, factor=factor, **spec.rope_options())
        new_length = rope.new_length(info.trained_length, factor)
        notes = engine_warnings(spec, info.trained_length, new_length)
    if recipe.finetune is not None and new_length is not None:
        # Samples that cannot be built (task sources that do not fit, short batches, masks)
        # refused now, not after the evaluation before the fine-tune.
        from ctxext.finetune.setup import check_training_data

        seq = recipe.finetune.train_length or new_length
        check_training_data(recipe.finetune, config, source.path, info.trained_length, seq)
    if recipe.eval is not None and recipe.eval.reference_model is not None:
        locate.resolve_model(recipe.eval.reference_model)  # a bad name refused now, not later
    name = source.name if source.source != "local" else Path(source.name).name
    return _Preflight(source, name, config, info.trained_length, factor, new_length, notes)


def _check_output(out: Path, recipe_path: Path, inputs: list[Path], overwrite: bool) -> Path:
    from ctxext import outputs

    cwd = Path.cwd().resolve()
    real = out.resolve()
    if real == cwd or real in cwd.parents:
        raise CtxextError(
            f"output_dir {out} is the current folder or one of its parents; choose a new "
            "folder, e.g. runs/NAME"
        )
    if real == recipe_path.parent or real in recipe_path.parents:
        raise CtxextError(
            f"output_dir {out} holds the recipe file {recipe_path}; choose another output_dir "
            "(--output-dir)"
        )
    return outputs.check_output_path(out, inputs, overwrite)


def run_recipe(
    loaded: LoadedRecipe,
    *,
    overwrite: bool = False,
    hooks: RunHooks | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Run a validated recipe; returns the summary (output folder, results, timings).

    A Hub model's revision (a branch, say) is resolved to a commit once, and every phase reads
    that commit (:func:`ctxext.locate.one_commit_per_revision`); provenance records it.
    """
    from ctxext import locate

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CtxextError(
            "ctxext run drives a whole recipe in one process; under accelerate launch run the "
            "fine-tune alone (accelerate launch -m ctxext finetune ...), then ctxext eval"
        )
    with locate.one_commit_per_revision():
        return _run(loaded, overwrite, hooks or RunHooks(), trust_remote_code, allow_pickle)


def _run(
    loaded: LoadedRecipe,
    overwrite: bool,
    hooks: RunHooks,
    trust_remote_code: bool,
    allow_pickle: bool,
) -> dict[str, Any]:
    from ctxext import locate, outputs

    recipe = loaded.recipe
    out = loaded.output_dir()
    _check_output(out, loaded.path, [], overwrite)  # fail before any model is resolved
    hooks.status(f"checking {recipe.model or locate.DEFAULT_MODEL}")
    pre = preflight(recipe)
    out = _check_output(out, loaded.path, [pre.source.path], overwrite)
    for note in pre.notes:
        hooks.warning(note)
    started = time.perf_counter()
    with seeded(recipe.seed), outputs.atomic_output(out) as tmp:
        _write_resolved(loaded, tmp / "recipe.yaml")
        ckpt = tmp / recipe.outputs.checkpoint if recipe.writes_checkpoint() else None
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        run = RecipeRun(loaded, pre, tmp, out, ckpt, hooks, trust_remote_code, allow_pickle)
        summary = run.execute()
        summary["seconds"] = round(time.perf_counter() - started, 2)
        _finish_outputs(run, summary)
    summary["output_dir"] = str(out)
    hooks.status(f"wrote {out}")
    return summary


def _write_resolved(loaded: LoadedRecipe, path: Path) -> None:
    from ctxext import __version__

    source = f"shipped recipe {loaded.name}" if loaded.shipped else str(loaded.path)
    header = [
        f"# Resolved by ctxext {__version__} from {source}",
        *(
            [f"# with overrides: {' '.join(loaded.overrides)}"]
            if loaded.overrides
            else ["# (no overrides)"]
        ),
        "# Every default is written out; `ctxext run THIS_FILE --output-dir NEW` repeats the run.",
    ]
    body = yaml.safe_dump(loaded.resolved(), sort_keys=False, allow_unicode=True)
    path.write_text("\n".join(header) + "\n" + body, encoding="utf-8")


class RecipeRun:
    """One execution of a recipe inside the temporary output folder."""

    def __init__(
        self,
        loaded: LoadedRecipe,
        pre: _Preflight,
        tmp: Path,
        out: Path,
        ckpt: Path | None,
        hooks: RunHooks,
        trust_remote_code: bool,
        allow_pickle: bool,
    ) -> None:
        self.loaded, self.recipe, self.pre = loaded, loaded.recipe, pre
        self.tmp, self.out, self.ckpt, self.hooks = tmp, out, ckpt, hooks
        self.trust_remote_code, self.allow_pickle = trust_remote_code, allow_pickle
        self.finetune_summary: dict[str, Any] | None = None
        self.extend_record: dict[str, Any] | None = None
        self.results: dict[str, Any] | None = None
        self.timings: dict[str, float] = {}
        #: The effective length's reference (the base model unscaled), measured once per run.
        self.references: dict[str | None, Any] = {}

    # -- stages

    def execute(self) -> dict[str, Any]:
        recipe = self.recipe
        if recipe.extend is not None and recipe.finetune is None:
            self._timed("extend", self._extend)
        items = recipe.variants()
        needs_ckpt = {"finetuned"} | ({"extended"} if recipe.finetune is None else set())
        early = [i for i in items if i not in needs_ckpt or self.ckpt_ready()]
        late = [i for i in items if i not in early]
        parts: list[dict[str, Any]] = []
        # Variants that do not need the fine-tuned checkpoint are measured first: a data
        # problem (no document long enough) then shows up before minutes of training.
        if early:
            parts.append(self._timed("eval", lambda: self._eval(early)))
        if recipe.finetune is not None:
            self._timed("finetune", self._finetune)
        if late:
            parts.append(self._timed("eval", lambda: self._eval(late)))
        if parts:
            self.results = _merge_results(parts, items)
        return {
            "recipe": self.loaded.name,
            "checkpoint": str(self.out / recipe.outputs.checkpoint) if self.ckpt else None,
            "finetune": self.finetune_summary,
            "results": self.results,
            "timings": self.timings,
        }

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - t0, 2)

    def ckpt_ready(self) -> bool:
        return self.ckpt is not None and (self.ckpt / "config.json").is_file()

    def _extend(self) -> None:
        from ctxext.config import ExtendJob
        from ctxext.extend import plan_extend, write_extended

        assert self.ckpt is not None and self.recipe.extend is not None
        self.hooks.status(f"extend: writing {self.recipe.outputs.checkpoint}/ (config only)")
        plan = plan_extend(self.recipe.model, self.recipe.extend)
        job = ExtendJob(model=self.recipe.model, output=self.ckpt, extend=self.recipe.extend)
        self.extend_record = write_extended(plan, job)

    def _finetune(self) -> None:
        from ctxext.finetune.loop import run_finetune

        assert self.ckpt is not None and self.recipe.finetune is not None
        self.hooks.status("finetune: training at the extended length")
        outer = self.hooks.finetune

        def progress(event: str, info: dict[str, Any]) -> None:
            if event == "warning" and info["message"] in self.pre.notes:
                return  # the run said it when it started
            if outer is not None:
                outer(event, info)

        self.finetune_summary = run_finetune(
            self.recipe.model,
            self.ckpt,
            self.recipe.extend,
            self.recipe.finetune,
            progress=progress,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
        )

    def _eval(self, items: list[str]) -> dict[str, Any]:
        from ctxext.evaluate.run import run_eval

        assert self.recipe.eval is not None
        variants = [self._variant(item) for item in items]
        self.hooks.status(f"eval: {', '.join(items)}")
        # Every row made from the base model (extended, fine-tuned, methods) is judged against
        # the base model before fine-tuning, unscaled; another model against itself.
        base = self.recipe.model
        own = {"base", "extended", "finetuned", *ALL_METHODS}
        reference_of = {v.model: base for i, v in zip(items, variants, strict=True) if i in own}
        results = run_eval(
            variants,
            self.recipe.eval,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            progress_factory=self._factory([self._label(i) for i in items]),
            reference_of=reference_of,
            references=self.references,
        )
        for item, run in zip(items, results["runs"], strict=True):
            self._relabel(item, run)
        return results

    # -- variants

    def _variant(self, item: str) -> Any:
        from ctxext.evaluate.variants import Variant

        base = self.recipe.model
        extend = self.recipe.extend
        if item == "base":
            return Variant(base)
        if item == "extended":
            return Variant(base, extend) if self.recipe.finetune else Variant(str(self.ckpt))
        if item == "finetuned":
            return Variant(str(self.ckpt))
        if item in ALL_METHODS:
            assert extend is not None
            if item == extend.method:
                return Variant(base, extend)
            spec = ExtendConfig(
                method=item,  # type: ignore[arg-type]
                factor=extend.factor,
                target_length=extend.target_length,
            )
            return Variant(base, spec)
        return Variant(item)

    def _label(self, item: str) -> str:
        """A stable, readable row label (the temporary folder's name is not one)."""
        name, recipe, factor = self.pre.name, self.recipe, self.pre.factor
        scaled = recipe.extend.label(factor) if recipe.extend and factor else ""
        if item == "base":
            return name
        if item == "extended":
            return f"{name} + {scaled}"
        if item == "finetuned":
            return f"{name} + {scaled} + fine-tune" if scaled else f"{name} + fine-tune"
        if item in ALL_METHODS:
            return f"{name} + {item} x{factor:g}"
        return item

    def _factory(self, labels: list[str]) -> Any:
        """Progress tasks named by our labels: run_eval opens one task per variant and task
        (ppl, then passkey), in variant order."""
        outer = self.hooks.eval_factory
        if outer is None:
            return None
        per_variant = len(set(self.recipe.eval.tasks)) if self.recipe.eval else 1
        calls = iter(range(10**9))

        def factory(description: str, total: int) -> Callable[[int], None]:
            if description.startswith("reference "):  # scored before the rows, not one of them
                return outer(description, total)
            index = next(calls) // max(per_variant, 1)
            task = description.rsplit(" ", 1)[-1]
            label = labels[index] if index < len(labels) else description.rsplit(" ", 1)[0]
            return outer(f"{label} {task}", total)

        return factory

    def _relabel(self, item: str, run: dict[str, Any]) -> None:
        recipe = self.recipe
        run["variant"] = item
        run["label"] = self._label(item)
        if item == "finetuned" or (item == "extended" and recipe.finetune is None):
            run["model"] = f"{recipe.outputs.checkpoint} (in output_dir)"
            run["model_path"] = str(self.out / recipe.outputs.checkpoint)
        elif item in ("base", "extended") or item in ALL_METHODS:
            run["model"] = recipe.model or run["model"]


def _merge_results(parts: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One results document from evaluations run at different stages (same data, protocol)."""
    merged = dict(parts[0])
    fingerprints = {p["data"]["fingerprint"] for p in parts}
    if len(fingerprints) != 1:  # pragma: no cover - same config, same data by construction
        raise CtxextError("the evaluation data changed during the run; run it again")
    runs = [r for p in parts for r in p["runs"]]
    runs.sort(key=lambda r: order.index(r["variant"]))
    merged["runs"] = runs
    merged["seconds"] = round(sum(p["seconds"] for p in parts), 2)
    for p in parts:
        merged["protocol"] = {**p.get("protocol", {}), **merged.get("protocol", {})}
    return merged


def _finish_outputs(run: RecipeRun, summary: dict[str, Any]) -> None:
    from ctxext import modelcard
    from ctxext.report.files import write_outputs

    run.hooks.status("writing results, report and model card")
    prov = provenance(run)
    summary["provenance"] = prov
    if run.results is not None:
        run.results["provenance"] = prov
        write_outputs(run.results, run.tmp)
    if run.ckpt is not None and run.ckpt_ready():
        modelcard.write_model_card(run.ckpt / "README.md", card_info(run, prov))
    report = run.tmp / run.recipe.outputs.report
    report.parent.mkdir(parents=True, exist_ok=True)
    _unlink(report)
    report.write_text(render_report(run, summary), encoding="utf-8")


def _unlink(path: Path) -> None:
    """Remove a file before writing it: it may be a hard link into the source checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
