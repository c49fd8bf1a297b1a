"""One line per validation failure: ``--flag: problem`` for a command's flags (while the CLI
says which flag sets which key, :func:`flag_names`), ``WHERE: key: problem`` for recipe files
and everything else."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)

from ctxext.errors import CtxextError
from ctxext.text import plural

#: key path (ints left out) -> the flag that sets it, or None; set while a CLI command runs.
FlagOf = Callable[[tuple[str, ...]], str | None]
_FLAG_OF: ContextVar[FlagOf | None] = ContextVar("ctxext_flag_of", default=None)


@contextlib.contextmanager
def flag_names(flag_of: FlagOf | None) -> Iterator[None]:
    """While it lasts, validation errors name the flag the user typed (``--task``) instead of
    the schema's key path (``tasks.0``); keys no flag sets keep their names. The CLI sets it
    around each command; recipe files always report their own keys."""
    token = _FLAG_OF.set(flag_of)
    try:
        yield
    finally:
        _FLAG_OF.reset(token)


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
    problem = _problem(err, loc, cls)
    flag_of = _FLAG_OF.get() if position is None else None
    if flag_of is not None:
        path = tuple(str(p) for p in loc if not isinstance(p, int))
        if not path and cls is not None:  # a model validator's problem names keys: say flags
            return _with_flags(problem, cls, flag_of) + more
        flag = flag_of(path) if path else None
        if flag is not None:
            return f"{flag}: {problem}{more}"
    written = position(loc) if position is not None else ""
    return f"{where}: {key}{written}: {problem}{more}"


def _with_flags(problem: str, cls: type[BaseModel], flag_of: FlagOf) -> str:
    """``give exactly one of factor and target_length`` -> ``... --factor and --target-length``
    (the keys of ``cls`` that a flag sets; other words stay)."""

    def flag(match: re.Match[str]) -> str:
        return flag_of((match.group(0),)) or match.group(0)

    names = sorted(cls.model_fields, key=len, reverse=True)
    pattern = r"(?<![\w-])(?:" + "|".join(map(re.escape, names)) + r")(?![\w-])"
    return re.sub(pattern, flag, problem)


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
