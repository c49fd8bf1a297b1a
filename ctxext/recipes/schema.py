"""The recipe schema: the typed sections of the single commands, the variants to compare, and
the names of what a run writes."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError

from ctxext.config import EvalConfig, ExtendConfig, FinetuneConfig, StrictModel
from ctxext.rope.methods import ALL_METHODS
from ctxext.text import plural

#: Names in ``eval.compare`` with a fixed meaning (anything else is a model folder or Hub id).
VARIANT_WORDS = ("base", "extended", "finetuned")
#: Files a run writes at the top of output_dir (``outputs`` may not reuse these names).
FIXED_OUTPUTS = (
    "recipe.yaml",
    "results.json",
    "results.csv",
    "ppl_vs_length.png",
    "passkey_heatmap.png",
    "retrieval_heatmap.png",
    "context_use.png",
)


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
                elif item in ALL_METHODS and self.extend is None:
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
            loss = ", LongCE" if ft.loss == "longce" else ""
            mix = ""
            if ft.mix is not None:
                mix = ", mix " + " + ".join(f"{m.source} {m.weight:g}" for m in ft.mix)
            parts.append(f"finetune {plural(ft.steps, 'step')} ({kind}{pose}{loss}{mix})")
        if self.eval is not None:
            lengths = ", ".join(str(n) for n in self.eval.lengths)  # wraps in a narrow table
            parts.append(f"eval {' vs '.join(self.variants())} at {lengths}")
        return "; ".join(parts)
