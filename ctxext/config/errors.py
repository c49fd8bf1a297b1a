"""One line per validation failure: ``WHERE: key: problem`` for flags and recipe files alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from ctxext.errors import CtxextError
from ctxext.text import plural


def parse_model(cls: type[BaseModel], data: dict, where: str) -> BaseModel:
    """Validate ``data`` into ``cls``; a failure becomes one CtxextError line naming the key."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise CtxextError(format_validation_error(e, where, cls)) from None


def format_validation_error(
    e: ValidationError,
    where: str,
    cls: type[BaseModel] | None = None,
    position: Callable[[tuple[Any, ...]], str] | None = None,
) -> str:
    """``WHERE: key.sub<position>: problem`` for the first problem, and how many more.

    The one formatter for flags and recipe files alike. ``cls`` (the validated model) lets an
    unknown key list the valid ones; ``position(loc)`` may add where the key was written,
    e.g. `` (line 12)``.
    """
    errors = e.errors()
    err = errors[0]
    # ctx["at"]: a model validator may point at the key its problem is about.
    loc = tuple(err["loc"]) + tuple((err.get("ctx") or {}).get("at", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    more = f" (and {plural(len(errors) - 1, 'more problem')})" if len(errors) > 1 else ""
    written = position(loc) if position is not None else ""
    return f"{where}: {key}{written}: {_problem(err, loc, cls)}{more}"


def _problem(err: Any, loc: tuple[Any, ...], cls: type[BaseModel] | None) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        parent = model_at(cls, loc[:-1]) if cls is not None else None
        return f"unknown key; expected one of: {keys_of(parent)}" if parent else "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        got = _short_repr(err.get("input"))
        return f"expected {msg.removeprefix('Input should be ')} (got {got})"
    return msg


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` in ``cls`` (None if none)."""
    for part in loc:
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        nested = _model_in(info.annotation)
        if nested is None:
            return None
        cls = nested
    return cls


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def keys_of(cls: type[BaseModel]) -> str:
    """The keys ``cls`` accepts, comma-separated."""
    return ", ".join(cls.model_fields)
