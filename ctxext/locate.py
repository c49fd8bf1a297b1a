"""Where a model comes from: a bundled short name, a local folder or a Hub id
(``ORG/NAME[@REVISION]``), turned into a folder on disk (:class:`ResolvedModel`).

Nothing here loads weights; the Hub's downloads are :mod:`ctxext.hub`'s.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from ctxext.errors import CtxextError
from ctxext.hub import DownloadProgress, Need, fetch_files

#: Short names for the models that ship inside the package.
BUNDLED_MODELS = {"stdlib-llama": "stdlib-llama"}
DEFAULT_MODEL = "stdlib-llama"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
#: (repo id, revision asked for) -> the commit it resolved to, inside :func:`one_commit_per_revision`.
_PINS: ContextVar[dict[tuple[str, str | None], str] | None] = ContextVar("pins", default=None)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are on disk and what the user called it.

    For a Hub model, ``repo_id``/``revision`` say what was asked for, ``commit`` the commit
    it resolved to, and ``files`` the repository files ctxext fetched (and may pass on: the
    snapshot folder can also hold files other tools downloaded).
    """

    name: str
    path: Path
    source: Literal["bundled", "local", "hub-cache"]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: tuple[str, ...] | None = None

    def record(self) -> dict[str, Any]:
        """What provenance records about where the model came from."""
        out: dict[str, Any] = {"model": self.name, "kind": self.source, "path": str(self.path)}
        if self.repo_id is not None:
            out.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        return out


def bundled_path(short_name: str = DEFAULT_MODEL) -> Path:
    return Path(__file__).parent / "bundled" / BUNDLED_MODELS[short_name]


def resolve_model(
    name: str | None,
    need: Need = "config",
    *,
    allow_pickle: bool = False,
    progress: DownloadProgress | None = None,
) -> ResolvedModel:
    """Turn a short name, a folder or a Hub id (``ORG/NAME[@REVISION]``) into a local folder.

    Hub models are fetched through huggingface_hub, which honours HF_HUB_OFFLINE, HF_ENDPOINT
    and the HF cache variables (offline, a populated cache is enough), and only the files
    ``need`` asks for (see :func:`ctxext.hub.select_hub_files`): a config-only command never downloads a
    weight file.
    """
    name = name or DEFAULT_MODEL
    if name in BUNDLED_MODELS:
        path = bundled_path(name)
        if not (path / "config.json").is_file():
            raise CtxextError(
                f"the bundled model '{name}' is missing from {path}; reinstall ctxext or "
                "regenerate it with `python -m ctxext.bundled_train`"
            )
        return ResolvedModel(name, path, "bundled")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CtxextError(f"'{name}' is a file; pass the model folder that holds config.json")
        return ResolvedModel(name, path.resolve(), "local")
    repo_id, _, revision = name.partition("@")
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(repo_id) or name.endswith("@"):
        raise CtxextError(
            f"model folder '{name}' does not exist; pass an existing folder, a Hub id "
            f"(org/name, optionally @revision) or the bundled model '{DEFAULT_MODEL}'"
        )
    pins, key = _PINS.get(), (repo_id, revision or None)
    commit = pins.get(key) if pins is not None else None
    hub = ResolvedModel(name, Path(), "hub-cache", repo_id, revision or None, commit)
    resolved = fetch(hub, need, allow_pickle=allow_pickle, progress=progress)
    if pins is not None and resolved.commit is not None:
        pins.setdefault(key, resolved.commit)
    return resolved


@contextlib.contextmanager
def one_commit_per_revision() -> Iterator[None]:
    """Meanwhile a Hub revision is resolved to a commit once: every later :func:`resolve_model`
    of the same ``ORG/NAME[@REVISION]`` reads the commit the first one found.

    A command of several phases (``ctxext run``: its pre-run check, extend, fine-tune, eval)
    runs inside one block, so a branch that moves while it runs cannot give two phases two
    versions of the model. Nested blocks share the outermost block's commits.
    """
    if _PINS.get() is not None:
        yield
        return
    token = _PINS.set({})
    try:
        yield
    finally:
        _PINS.reset(token)


def fetch(
    model: ResolvedModel,
    need: Need,
    *,
    allow_pickle: bool = False,
    progress: DownloadProgress | None = None,
) -> ResolvedModel:
    """Make sure ``need``'s files of a resolved model are on disk (a no-op for folders).

    Once the commit is known it is used: a branch that moves meanwhile cannot mix two commits.
    """
    if model.repo_id is None:
        return model
    path, commit, files = fetch_files(
        model.repo_id,
        model.revision,
        need,
        commit=model.commit,
        allow_pickle=allow_pickle,
        progress=progress,
    )
    return replace(model, path=path, commit=commit, files=tuple(files))
