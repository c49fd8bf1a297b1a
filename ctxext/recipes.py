"""Recipes: one YAML file reproduces a whole extend -> fine-tune -> eval run.

A recipe holds the same typed sections the single commands build from their flags
(:class:`~ctxext.config.ExtendConfig`, :class:`~ctxext.config.FinetuneConfig`,
:class:`~ctxext.config.EvalConfig`), so a recipe says nothing the commands cannot and the other
way round. ``ctxext run RECIPE [key.sub=value ...]`` loads it (``yaml.safe_load`` semantics,
keys tracked to their line), applies the overrides, validates everything (unknown keys are
errors) and only then runs:

1. preflight: the model is resolved and the extension checked against its config; the output
   folder is checked (refused if it exists, unless ``overwrite``);
2. the checkpoint (``output_dir/model``): ``extend`` alone writes the extended checkpoint
   (config-only); with ``finetune`` the fine-tuned, merged checkpoint;
3. evaluation of the variants ``eval.compare`` names (base, extended, finetuned, other scaling
   methods applied in memory, or other checkpoints), side by side, with the same data;
4. outputs: ``recipe.yaml`` (resolved, after overrides, every default written out),
   ``results.json`` (with provenance), ``results.csv``, the plots, ``report.md`` and the model
   card ``model/README.md``.

Everything is built in a temporary sibling of ``output_dir`` and renamed into place at the end,
so a failed or interrupted run leaves nothing half-written. The recipe seed seeds Python,
NumPy and torch (and is the default seed of the fine-tune and eval sections), so re-running a
recipe on the same CPU reproduces results.json's numbers exactly.

This module imports no torch at import time (the CLI's ``--help`` stays instant).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxext.config import (
    EvalConfig,
    ExtendConfig,
    FinetuneConfig,
    Method,
    StrictModel,
    format_validation_error,
    keys_of,
)
from ctxext.errors import CtxextError
from ctxext.text import plural

__all__ = [
    "RECIPES_DIR",
    "LoadedRecipe",
    "Recipe",
    "RecipeEval",
    "RecipeOutputs",
    "RunHooks",
    "apply_overrides",
    "find_recipe",
    "load_recipe",
    "parse_yaml",
    "run_recipe",
    "seeded",
    "shipped_recipes",
]

#: Shipped recipes live inside the package so that `pip install` ships them.
RECIPES_DIR = Path(__file__).parent / "recipes"
METHODS: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
#: Names in ``eval.compare`` with a fixed meaning (anything else is a model folder or Hub id).
VARIANT_WORDS = ("base", "extended", "finetuned")
#: Files a run writes at the top of output_dir (``outputs`` may not reuse these names).
FIXED_OUTPUTS = (
    "recipe.yaml",
    "results.json",
    "results.csv",
    "ppl_vs_length.png",
    "passkey_heatmap.png",
)


# --------------------------------------------------------------------------- schema


class RecipeEval(EvalConfig):
    """The ``eval:`` section: every `ctxext eval` option, plus which variants to compare."""

    compare: list[str] | None = None
    """Rows of the results table, in order: ``base`` (the model as it is), ``extended`` (the
    model with the recipe's extension, no fine-tune), ``finetuned`` (the fine-tuned checkpoint),
    a method name (linear, ntk, yarn, dynamic, llama3: the base model with that method at the
    recipe's factor, applied in memory), or any other model folder / Hub id (evaluated as it
    is, e.g. a published checkpoint to compare against). Default: base (unless include_base is
    false), extended (when the recipe extends) and finetuned (when it fine-tunes)."""

    @field_validator("compare")
    @classmethod
    def _compare(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one variant, e.g. [base, extended, finetuned]")
        seen = set()
        for item in v:
            if not item.strip():
                raise ValueError("variant names must not be empty")
            if item in seen:
                raise ValueError(f"'{item}' is listed twice")
            seen.add(item)
        return v


def _inside_name(value: str) -> str:
    """A path relative to output_dir that cannot leave it."""
    posix = PurePosixPath(value.replace("\\", "/"))
    if (
        not value.strip()
        or posix.is_absolute()
        or PureWindowsPath(value).is_absolute()
        or value.startswith("~")
        or ".." in posix.parts
        or not posix.parts
        or posix.parts == (".",)
    ):
        raise ValueError(
            f"must be a relative path inside output_dir, without '..' (got {value!r}), "
            "e.g. model or checkpoints/model"
        )
    if posix.as_posix() in FIXED_OUTPUTS:
        raise ValueError(f"{value!r} is a file every run writes; choose another name")
    return posix.as_posix()


class RecipeOutputs(StrictModel):
    """Names of the files and folders a run writes, relative to output_dir."""

    checkpoint: str = "model"
    """Folder of the extended / fine-tuned checkpoint (and its model card, README.md)."""
    report: str = "report.md"
    """The Markdown report: what was done, the tables, the plots."""

    @field_validator("checkpoint", "report")
    @classmethod
    def _relative(cls, v: str) -> str:
        return _inside_name(v)

    @model_validator(mode="after")
    def _distinct(self) -> RecipeOutputs:
        ckpt, report = PurePosixPath(self.checkpoint), PurePosixPath(self.report)
        if ckpt == report or ckpt in report.parents:
            raise ValueError("checkpoint and report must be different paths (report outside it)")
        return self


class Recipe(StrictModel):
    """A reproducible run: extend -> (fine-tune) -> eval, with a report and a model card."""

    description: str | None = None
    """One or two sentences: what the recipe reproduces (shown by `ctxext recipes list`)."""
    model: str | None = None
    """Model folder, Hub id or bundled short name (default: stdlib-llama, the bundled model)."""
    extend: ExtendConfig | None = None
    """How to rewrite the rotary configuration (the options of `ctxext extend`)."""
    finetune: FinetuneConfig | None = None
    """A fine-tune at the extended length (the options of `ctxext finetune`)."""
    eval: RecipeEval | None = None
    """What to measure (the options of `ctxext eval`) and which variants to compare."""
    output_dir: Path | None = None
    """Folder for everything the run writes (default: runs/<recipe name>); relative paths are
    relative to the current directory."""
    outputs: RecipeOutputs = RecipeOutputs()
    """Names of the checkpoint folder and the report inside output_dir."""
    seed: int = 0
    """Seeds Python, NumPy and torch, and is the default seed of finetune and eval."""

    @model_validator(mode="before")
    @classmethod
    def _propagate_seed(cls, data: Any) -> Any:
        """Sections without their own seed take the recipe's (written out in recipe.yaml)."""
        if not isinstance(data, dict):
            return data
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            return data  # the field validator reports it
        out = dict(data)
        for section in ("finetune", "eval"):
            body = out.get(section)
            if isinstance(body, dict) and "seed" not in body:
                out[section] = {**body, "seed": seed}
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.extend is None and self.finetune is None and self.eval is None:
            raise ValueError("a recipe needs at least one of extend, finetune and eval")
        if self.eval is not None:
            for i, item in enumerate(self.eval.compare or []):
                problem = None
                if item == "extended" and self.extend is None:
                    problem = "'extended' needs an extend section"
                elif item == "finetuned" and self.finetune is None:
                    problem = "'finetuned' needs a finetune section"
                elif item in METHODS and self.extend is None:
                    problem = (
                        f"the method '{item}' takes the recipe's extend factor: add an extend "
                        "section"
                    )
                elif item == "longrope" and self.extend.method != "longrope":
                    problem = "'longrope' needs per-pair factors: use it as the extend method"
                if problem:
                    # ctx["at"]: where the problem is, for the error message's key and line.
                    raise PydanticCustomError(
                        "recipe_consistency", problem, {"at": ("eval", "compare", i)}
                    )
        return self

    def variants(self) -> list[str]:
        """The eval rows, in order (``eval.compare`` or its default)."""
        if self.eval is None:
            return []
        if self.eval.compare is not None:
            return list(self.eval.compare)
        out = ["base"] if self.eval.include_base or (not self.extend and not self.finetune) else []
        if self.extend is not None:
            out.append("extended")
        if self.finetune is not None:
            out.append("finetuned")
        return out

    def writes_checkpoint(self) -> bool:
        return self.extend is not None or self.finetune is not None

    def summary(self) -> str:
        """One line: what the recipe does."""
        parts = []
        if self.extend is not None:
            size = (
                f"x{self.extend.factor:g}"
                if self.extend.factor is not None
                else f"to {self.extend.target_length}"
            )
            parts.append(f"extend {self.extend.method} {size}")
        if self.finetune is not None:
            ft = self.finetune
            kind = f"LoRA r={ft.lora_rank}" if ft.lora_rank else "full"
            pose = f", PoSE window {ft.train_length}" if ft.pose else ""
            parts.append(f"finetune {plural(ft.steps, 'step')} ({kind}{pose})")
        if self.eval is not None:
            lengths = ",".join(str(n) for n in self.eval.lengths)
            parts.append(f"eval {' vs '.join(self.variants())} at {lengths}")
        return "; ".join(parts)


# --------------------------------------------------------------------------- YAML + lines


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) whose node tree we also walk for key lines."""


Lines = dict[tuple[Any, ...], int]


def parse_yaml(text: str, where: str) -> tuple[Any, Lines]:
    """Parse like ``yaml.safe_load``; also return the 1-based line of every key and item.

    Invalid YAML and duplicate keys become one-line CtxextErrors naming ``where`` and the line.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        position = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise CtxextError(f"{where}: invalid YAML{position}: {problem}; fix the file") from None
    except yaml.YAMLError as e:
        raise CtxextError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    lines: Lines = {}
    if node is not None:
        _walk(node, (), lines, where)
    return data, lines


def _walk(node: yaml.Node, path: tuple[Any, ...], lines: Lines, where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                dotted = ".".join(str(p) for p in (*path, key))
                raise CtxextError(
                    f"{where}: {dotted} (line {line}): duplicate key (first on line "
                    f"{seen[key]}); keep one"
                )
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, where)


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``finetune.steps=10`` -> (("finetune", "steps"), 10); values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or not key.strip() or any(not p for p in parts):
        raise CtxextError(
            f"override '{text}' must look like key.sub=value, e.g. finetune.steps=10 or "
            "eval.lengths=[256,512]"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or "not a YAML value"
        raise CtxextError(
            f"override '{text}': the value is not valid YAML ({problem}); quote strings, "
            "write lists as [a,b]"
        ) from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[tuple[str, ...], str]:
    """Apply ``key.sub=value`` overrides to the raw recipe dict in place.

    Missing intermediate sections are created (``finetune.steps=10`` adds a finetune section);
    ``section=null`` removes one. Returns which key paths came from which override.
    """
    origin: dict[tuple[str, ...], str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise CtxextError(
                    f"override '{text}': {dotted} is a value, not a section; override "
                    f"{dotted}=... itself"
                )
            node = child
        node[parts[-1]] = value
        origin[parts] = text
    return origin


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedRecipe:
    """A validated recipe and where it came from."""

    recipe: Recipe
    name: str
    path: Path
    shipped: bool
    overrides: list[str] = field(default_factory=list)

    def resolved(self) -> dict[str, Any]:
        """Every key with its value (defaults included): what recipe.yaml records."""
        return self.recipe.model_dump(mode="json")

    def output_dir(self) -> Path:
        """Where the run writes (relative paths: relative to the current folder)."""
        out = self.recipe.output_dir or Path("runs") / self.name
        return out.expanduser().absolute()


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> file."""
    if not RECIPES_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str) -> tuple[Path, bool]:
    """A recipe file: an existing path, or the name of a shipped recipe (``tiny-yarn``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path, False
    if path.is_dir():
        raise CtxextError(f"{name_or_path} is a folder; pass a recipe .yaml file")
    shipped = shipped_recipes()
    stem = name_or_path.removesuffix(".yaml").removesuffix(".yml")
    if stem in shipped and "/" not in name_or_path:
        return shipped[stem], True
    names = ", ".join(shipped) or "none installed"
    raise CtxextError(
        f"recipe '{name_or_path}' is neither a file nor a shipped recipe ({names}); "
        "`ctxext recipes list` shows the shipped ones"
    )


def load_recipe(
    name_or_path: str, overrides: Sequence[str] = (), output_dir: Path | None = None
) -> LoadedRecipe:
    """Find, parse, override and validate a recipe; every problem is one CtxextError line.

    ``output_dir`` (the CLI's --output-dir) replaces the recipe's, like an override, so the
    resolved recipe records where the run actually wrote.
    """
    path, shipped = find_recipe(name_or_path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CtxextError(f"{where} is not UTF-8 text; save the recipe as UTF-8") from None
    except OSError as e:
        raise CtxextError(f"{where}: cannot read it ({e.strerror}); check the path") from None
    data, lines = parse_yaml(text, where)
    if data is None and not overrides:
        raise CtxextError(
            f"{where}: the recipe is empty; expected a mapping with keys {keys_of(Recipe)}"
        )
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CtxextError(
            f"{where} (line 1): expected a mapping with keys {keys_of(Recipe)}, "
            f"got a {_yaml_type(data)}"
        )
    origin = apply_overrides(data, overrides)
    applied = list(overrides)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
        origin[("output_dir",)] = f"--output-dir {output_dir}"
        applied.append(f"--output-dir {output_dir}")
    recipe = validate_recipe(data, where, lines, origin)
    return LoadedRecipe(recipe, path.stem, path.resolve(), shipped, applied)


def validate_recipe(
    data: dict[str, Any],
    where: str,
    lines: Lines | None = None,
    origin: dict[tuple[str, ...], str] | None = None,
) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CtxextError(_format_error(e, where, lines or {}, origin or {})) from None


def _format_error(
    e: ValidationError, where: str, lines: Lines, origin: dict[tuple[str, ...], str]
) -> str:
    """``FILE: key.sub (line N): expected ...`` for the first problem, and how many more."""
    return format_validation_error(e, where, Recipe, lambda loc: _position(loc, lines, origin))


def _position(loc: tuple[Any, ...], lines: Lines, origin: dict[tuple[str, ...], str]) -> str:
    # An override replaced everything below its key: it wins over the file's lines.
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in origin:
            return f" (from the override '{origin[tuple(loc[:n])]}')"
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in lines:
            return f" (line {lines[tuple(loc[:n])]})"
    return ""


def _yaml_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- seeds


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


# --------------------------------------------------------------------------- running


@dataclass
class RunHooks:
    """How a run reports progress (the CLI renders these with Rich)."""

    status: Callable[[str], None] = lambda message: None
    finetune: Callable[[str, dict[str, Any]], None] | None = None
    eval_factory: Callable[[str, int], Callable[[int], None]] | None = None


@dataclass
class _Preflight:
    source: Any  # checkpoint.ResolvedModel
    name: str  # short display name of the base model
    config: dict[str, Any]
    trained_length: int
    factor: float | None
    new_length: int | None


def _preflight(recipe: Recipe) -> _Preflight:
    """Resolve the model and check the extension against its config (nothing heavy)."""
    from ctxext import checkpoint, rope

    source = checkpoint.resolve_model(recipe.model)
    config = checkpoint.read_config(source.path)
    info = rope.analyze(config)
    factor = new_length = None
    if recipe.extend is not None:
        spec = recipe.extend
        factor = rope.validate_request(info, spec.method, spec.factor, spec.target_length)
        rope.extend_config(config, spec.method, factor=factor, **spec.rope_options())
        new_length = rope.new_length(info.trained_length, factor)
    name = source.name if source.source != "local" else Path(source.name).name
    return _Preflight(source, name, config, info.trained_length, factor, new_length)


def _check_output(out: Path, recipe_path: Path, inputs: list[Path], overwrite: bool) -> Path:
    from ctxext import checkpoint

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
    return checkpoint.check_output_path(out, inputs, overwrite)


def run_recipe(
    loaded: LoadedRecipe,
    *,
    overwrite: bool = False,
    hooks: RunHooks | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Run a validated recipe; returns the summary (output folder, results, timings)."""
    from ctxext import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CtxextError(
            "ctxext run drives a whole recipe in one process; under accelerate launch run the "
            "fine-tune alone (accelerate launch -m ctxext finetune ...), then ctxext eval"
        )
    hooks = hooks or RunHooks()
    recipe = loaded.recipe
    out = loaded.output_dir()
    _check_output(out, loaded.path, [], overwrite)  # fail before any model is resolved
    hooks.status(f"checking {recipe.model or checkpoint.DEFAULT_MODEL}")
    pre = _preflight(recipe)
    out = _check_output(out, loaded.path, [pre.source.path], overwrite)
    started = time.perf_counter()
    with seeded(recipe.seed), checkpoint.atomic_output(out) as tmp:
        _write_resolved(loaded, tmp / "recipe.yaml")
        ckpt = tmp / recipe.outputs.checkpoint if recipe.writes_checkpoint() else None
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        run = _Run(loaded, pre, tmp, out, ckpt, hooks, trust_remote_code, allow_pickle)
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


class _Run:
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

    # -- stages

    def execute(self) -> dict[str, Any]:
        recipe = self.recipe
        if recipe.extend is not None and recipe.finetune is None:
            self._timed("extend", self._extend)
        items = recipe.variants()
        needs_ckpt = {"finetuned"} | ({"extended"} if recipe.finetune is None else set())
        early = [i for i in items if i not in needs_ckpt or self._ckpt_ready()]
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

    def _ckpt_ready(self) -> bool:
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
        self.finetune_summary = run_finetune(
            self.recipe.model,
            self.ckpt,
            self.recipe.extend,
            self.recipe.finetune,
            progress=self.hooks.finetune,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
        )

    def _eval(self, items: list[str]) -> dict[str, Any]:
        from ctxext.evalrun import run_eval

        assert self.recipe.eval is not None
        variants = [self._variant(item) for item in items]
        self.hooks.status(f"eval: {', '.join(items)}")
        results = run_eval(
            variants,
            self.recipe.eval,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
            progress_factory=self._factory([self._label(i) for i in items]),
        )
        for item, run in zip(items, results["runs"], strict=True):
            self._relabel(item, run)
        return results

    # -- variants

    def _variant(self, item: str) -> Any:
        from ctxext.evalrun import Variant

        base = self.recipe.model
        extend = self.recipe.extend
        if item == "base":
            return Variant(base)
        if item == "extended":
            return Variant(base, extend) if self.recipe.finetune else Variant(str(self.ckpt))
        if item == "finetuned":
            return Variant(str(self.ckpt))
        if item in METHODS:
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
        scaled = f"{recipe.extend.method} x{factor:g}" if recipe.extend and factor else ""
        if item == "base":
            return name
        if item == "extended":
            return f"{name} + {scaled}"
        if item == "finetuned":
            return f"{name} + {scaled} + fine-tune" if scaled else f"{name} + fine-tune"
        if item in METHODS:
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
        elif item in ("base", "extended") or item in METHODS:
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


# --------------------------------------------------------------------------- outputs


def _finish_outputs(run: _Run, summary: dict[str, Any]) -> None:
    from ctxext import modelcard
    from ctxext.report import write_outputs

    run.hooks.status("writing results, report and model card")
    provenance = _provenance(run)
    summary["provenance"] = provenance
    if run.results is not None:
        run.results["provenance"] = provenance
        write_outputs(run.results, run.tmp)
    if run.ckpt is not None and run._ckpt_ready():
        modelcard.write_model_card(run.ckpt / "README.md", _card_info(run, provenance))
    report = run.tmp / run.recipe.outputs.report
    report.parent.mkdir(parents=True, exist_ok=True)
    _unlink(report)
    report.write_text(render_report(run, summary), encoding="utf-8")


def _unlink(path: Path) -> None:
    """Remove a file before writing it: it may be a hard link into the source checkpoint."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


_HASH_CACHE: dict[tuple[int, int, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    """sha256 of a file, cached by inode (hard-linked weights are hashed once)."""
    from ctxext import checkpoint

    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = checkpoint.file_sha256(path)
    return _HASH_CACHE[key]


def _model_hashes(folder: Path) -> dict[str, Any]:
    from ctxext import checkpoint

    config = checkpoint.read_config(folder)
    return {
        "config_sha256": checkpoint.config_hash(config),
        "weights_sha256": {
            p.relative_to(folder).as_posix(): _sha256_file(p)
            for p in checkpoint.weight_files(folder)
        },
    }


def _provenance(run: _Run) -> dict[str, Any]:
    """Versions, seed and hashes: enough to tell whether two runs can be compared."""
    import torch

    from ctxext import checkpoint

    recipe_text = run.loaded.path.read_bytes()
    resolved = run.loaded.resolved()
    data: dict[str, Any] = {}
    if run.results is not None:
        data["eval"] = {
            "source": run.results["data"]["source"],
            "fingerprint_sha256": run.results["data"]["fingerprint"],
            "n_documents": run.results["data"]["n_documents"],
        }
    if run.finetune_summary is not None:
        ft = run.finetune_summary["data"]
        data["finetune"] = {
            "source": ft["source"],
            "fingerprint_sha256": ft["fingerprint"],
            "documents": ft["documents"],
            "tokens": ft["tokens"],
        }
    models = {
        "base": {
            "model": run.pre.name,
            "source": run.pre.source.record(),  # for a Hub model: repo, revision and commit
            **_model_hashes(run.pre.source.path),
        }
    }
    if run.ckpt is not None and run._ckpt_ready():
        models["output"] = {
            "folder": run.recipe.outputs.checkpoint,
            **_model_hashes(run.ckpt),
        }
    return {
        "recipe": {
            "name": run.loaded.name,
            "file": str(run.loaded.path),
            "shipped": run.loaded.shipped,
            "file_sha256": hashlib.sha256(recipe_text).hexdigest(),
            "overrides": run.loaded.overrides,
            "resolved": resolved,
            "resolved_sha256": checkpoint.config_hash(resolved),
        },
        "seed": run.recipe.seed,
        "versions": checkpoint.versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": True,
        "data": data,
        "models": models,
        "timings_s": run.timings,
    }


def _card_info(run: _Run, provenance: dict[str, Any]) -> dict[str, Any]:
    """What the model card needs, as plain data (see :mod:`ctxext.modelcard`)."""
    recipe, pre = run.recipe, run.pre
    own = "finetuned" if recipe.finetune is not None else "extended"
    runs = (run.results or {}).get("runs", [])
    return {
        # The Hub id, or the name of a bundled/local model (a local path is no metadata).
        "base_model": recipe.model if pre.source.source == "hub-cache" else pre.name,
        "base_is_hub": pre.source.source == "hub-cache",
        "model_name": f"{pre.name}-{recipe.extend.method}-{pre.new_length}"
        if recipe.extend and pre.new_length
        else f"{pre.name}-{run.loaded.name}",
        "recipe_name": run.loaded.name,
        "description": recipe.description,
        "extend": recipe.extend.model_dump(mode="json") if recipe.extend else None,
        "factor": pre.factor,
        "trained_length": pre.trained_length,
        "new_length": pre.new_length,
        "finetune": recipe.finetune.model_dump(mode="json") if recipe.finetune else None,
        "finetune_summary": run.finetune_summary,
        "results": run.results,
        "own_variant": own,
        "own_runs": [r for r in runs if r.get("variant") == own],
        "provenance": provenance,
    }


# --------------------------------------------------------------------------- report


def render_report(run: _Run, summary: dict[str, Any]) -> str:
    """report.md: what was done, the tables, the plots, provenance."""
    from ctxext.report import passkey_markdown, ppl_markdown

    recipe, pre = run.recipe, run.pre
    prov = summary["provenance"]
    lines = [f"# ctxext run: {run.loaded.name}", ""]
    if recipe.description:
        lines += [" ".join(recipe.description.split()), ""]
    lines += ["## What was done", ""]
    lines.append(
        f"- **Model**: `{recipe.model or pre.name}` (trained length {pre.trained_length} tokens)."
    )
    if recipe.extend is not None:
        spec = recipe.extend
        opts = {
            k: v
            for k, v in spec.rope_options().items()
            if v is not None and k in _method_option_names(spec.method)
        }
        extra = f", {', '.join(f'{k}={v:g}' for k, v in opts.items())}" if opts else ""
        lines.append(
            f"- **Extend**: {spec.method}, factor {pre.factor:g}{extra}: "
            f"{pre.trained_length} -> {pre.new_length} tokens (config rewrite; weights untouched)."
        )
    if recipe.finetune is not None and run.finetune_summary is not None:
        ft, s = recipe.finetune, run.finetune_summary
        kind = f"LoRA rank {ft.lora_rank}" if ft.lora_rank else "full fine-tune"
        pose = f", PoSE with {ft.train_length}-token windows" if ft.pose else ""
        loss = "-" if s.get("final_loss") is None else f"{s['final_loss']:.4f}"
        lines.append(
            f"- **Fine-tune**: {kind}{pose}; {plural(ft.steps, 'step')} x "
            f"{plural(s['global_batch'], 'sequence')} of {s['train_length']} tokens; lr "
            f"{ft.lr:g}, {plural(s['warmup_steps'], 'warm-up step')}, "
            f"{ft.lr_schedule}, AdamW ({ft.adam_beta1}, {ft.adam_beta2}); final loss {loss}; "
            f"{s['tokens_per_s'] or 0:,.0f} tokens/s; data {s['data']['source']} "
            f"({s['data']['tokens']:,} tokens). Loss curve: "
            f"[{recipe.outputs.checkpoint}/loss.png]({recipe.outputs.checkpoint}/loss.png)."
        )
    if run.results is not None:
        cfg = run.results["config"]
        lines.append(
            f"- **Eval**: {', '.join(cfg['tasks'])} at {', '.join(map(str, cfg['lengths']))} "
            f"tokens on {run.results['data']['source']} "
            f"(fingerprint `{run.results['data']['fingerprint']}`), seed {cfg['seed']}."
        )
    if run.ckpt is not None:
        name = recipe.outputs.checkpoint
        lines.append(
            f"- **Checkpoint**: [`{name}/`]({name}/) with its model card "
            f"[`{name}/README.md`]({name}/README.md)."
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in run.timings.items())
    lines += [f"- **Time**: {summary['seconds']:.1f}s ({timings}).", ""]
    if run.results is not None:
        proto = run.results.get("protocol", {}).get("ppl", {})
        if "ppl" in run.results["config"]["tasks"]:
            lines += ["## Perplexity (95% bootstrap interval over documents)", ""]
            if proto.get("description"):
                lines += [f"Protocol: {proto['description']}", ""]
            lines += [
                ppl_markdown(run.results),
                "",
                "![perplexity vs length](ppl_vs_length.png)",
                "",
            ]
        pk = passkey_markdown(run.results)
        if pk:
            lines += [
                "## Passkey retrieval (mean over depths)",
                "",
                pk,
                "",
                "![passkey](passkey_heatmap.png)",
                "",
            ]
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    lines += [
        "## Provenance",
        "",
        f"- Recipe: `recipe.yaml` (resolved; sha256 `{prov['recipe']['resolved_sha256'][:16]}`)"
        + (f", overrides `{' '.join(run.loaded.overrides)}`" if run.loaded.overrides else ""),
        f"- Seed {prov['seed']}; {versions}; Python {prov['python']}; "
        f"{prov['torch_threads']} torch threads.",
        f"- Base model config sha256 `{prov['models']['base']['config_sha256'][:16]}`"
        + (
            f"; output config sha256 `{prov['models']['output']['config_sha256'][:16]}`"
            if "output" in prov["models"]
            else ""
        )
        + ". Weight-file hashes are in `results.json` (provenance.models).",
        "",
        "Repeat: `ctxext run recipe.yaml --output-dir NEW_FOLDER`.",
        "",
    ]
    return "\n".join(lines)


def _method_option_names(method: str) -> tuple[str, ...]:
    return {
        "yarn": ("beta_fast", "beta_slow", "attention_factor"),
        "llama3": ("low_freq_factor", "high_freq_factor"),
        "ntk": ("theta_multiplier",),
        "longrope": ("attention_factor",),  # the factor lists are in recipe.yaml
    }.get(method, ())
