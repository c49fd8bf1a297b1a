"""Finding, parsing (YAML with the line of every key), overriding and validating a recipe.

Every problem becomes one CtxextError line naming the file, the key and its line (or the
override it came from).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ctxext.config import format_validation_error, keys_of
from ctxext.errors import CtxextError
from ctxext.recipes.schema import Recipe

#: Shipped recipes are the .yaml files of this package's folder (`pip install` ships them; the
#: repository's top-level recipes/ links here).
RECIPES_DIR = Path(__file__).parent


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
