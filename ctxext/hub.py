"""Fetching a model from the Hugging Face Hub: which files a command needs, downloading them
at one commit, and huggingface_hub's errors as one line each.

huggingface_hub is imported on use (the CLI's --help stays instant).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from ctxext.errors import CtxextError

#: What a command needs from a model: its config (inspect, extend --dry-run, pre-flight
#: checks), also its tokenizer (tokenizing data before any weight is fetched), or everything
#: needed to load it (extend, eval, finetune).
Need = Literal["config", "tokenizer", "weights"]
#: progress(description, total_bytes) -> update(bytes_done): one bar per weight file.
DownloadProgress = Callable[[str, int], Callable[[int], None]]

#: The small files the config-only commands read (only those a repo has are fetched).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def fetch_files(
    repo_id: str,
    revision: str | None,
    need: Need,
    *,
    commit: str | None = None,
    allow_pickle: bool = False,
    progress: DownloadProgress | None = None,
) -> tuple[Path, str, list[str]]:
    """Download ``need``'s files of ``repo_id`` at ``revision`` (at ``commit`` once that is
    known): (snapshot folder, commit, the repository files fetched).

    The config files first, always: they resolve the revision to a commit (recorded in the
    cache's refs/ for offline use) and cache the repository's file listing. Every other file is
    then fetched at that commit: a branch that moves meanwhile cannot mix two commits.
    """
    with hub_errors(repo_id, revision):
        path = _snapshot(repo_id, commit or revision, list(CONFIG_FILES))
        commit = path.name
        files = [f for f in CONFIG_FILES if (path / f).is_file()]
        if need != "config":
            listing = _repo_listing(repo_id, commit, path)
            files = select_hub_files(listing, need, allow_pickle, repo_id)
            for file in files:
                _download(repo_id, commit, file, progress if _is_weight(file) else None)
    return path, commit, files


def select_hub_files(
    listing: list[str], need: Need, allow_pickle: bool, repo_id: str = "the repository"
) -> list[str]:
    """The repository files a command needing ``need`` downloads.

    Only top-level files (never ``original/**`` or other sub-folders): the config files; with
    a tokenizer, its files; for loading, every small top-level JSON/Python file (indexes,
    remote code) and the safetensors weights. Pickled weights (``*.bin``) only where the repo
    has no safetensors and ``allow_pickle``; GGUF, ONNX, Flax, TF and ``*.pth`` never.
    """
    top = sorted(f for f in listing if "/" not in f)
    chosen = [f for f in top if f in CONFIG_FILES]
    if need == "config":
        return chosen
    chosen += [f for f in top if f in TOKENIZER_FILES or f.endswith(".tiktoken")]
    if need == "tokenizer":
        return sorted(set(chosen))
    safetensors = [f for f in top if f.endswith((".safetensors", ".safetensors.index.json"))]
    pickled = [f for f in top if f.endswith((".bin", ".bin.index.json"))]
    if safetensors:
        weights = safetensors
    elif not pickled:
        raise CtxextError(
            f"Hub model '{repo_id}' has no loadable weights (*.safetensors or *.bin); pass a "
            "complete model"
        )
    elif not allow_pickle:
        raise CtxextError(
            f"Hub model '{repo_id}' has only pickled weights ({pickled[0]}), which can run code "
            "when loaded; use a safetensors revision or pass --allow-pickle if you trust it"
        )
    else:
        weights = pickled
    small = [f for f in top if f.endswith((".json", ".py")) and not f.endswith(".index.json")]
    return sorted(set(chosen + small + weights))


def _is_weight(file: str) -> bool:
    return file.endswith((".safetensors", ".bin"))


def _snapshot(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def _repo_listing(repo_id: str, commit: str, snapshot: Path) -> list[str]:
    """The repository's files at ``commit``: the listing huggingface_hub cached while fetching
    the config (no request), else (a cache another tool filled) what the snapshot holds."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    except CachedRepoTreeNotFoundError:
        return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def _download(repo_id: str, commit: str, file: str, progress: DownloadProgress | None) -> None:
    from huggingface_hub import hf_hub_download

    # huggingface_hub's own bars are off in the CLI (HF_HUB_DISABLE_PROGRESS_BARS): weight
    # files get exactly one bar, ours (a class that is not huggingface_hub's is always shown).
    bar = _progress_class(progress, f"download {file}") if progress is not None else None
    if bar is None and _is_weight(file):
        from tqdm.auto import tqdm as bar
    hf_hub_download(repo_id, file, revision=commit, tqdm_class=bar)


def _progress_class(progress: DownloadProgress, description: str) -> type:
    """A tqdm class that draws nothing itself and reports its count to ``progress``."""
    from tqdm.auto import tqdm

    class _Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "file": open(os.devnull, "w")})  # noqa: SIM115
            self._report = progress(description, int(self.total or 0))

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._report(int(self.n))
            return shown

        def close(self) -> None:
            super().close()
            self.fp.close()

    return _Reporting


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors as one line each, saying what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    try:
        yield
    except CtxextError:
        raise
    except GatedRepoError as e:
        raise CtxextError(
            f"Hub model '{repo_id}' is gated: accept its licence on its Hub page and log in "
            "(hf auth login, or set HF_TOKEN)"
        ) from e
    except RevisionNotFoundError as e:
        raise CtxextError(
            f"Hub model '{repo_id}' has no revision '{revision}'; pass an existing branch, tag "
            "or commit after the @"
        ) from e
    except RepositoryNotFoundError as e:
        raise CtxextError(
            f"Hub model '{repo_id}' does not exist (or is private: log in with hf auth login); "
            "check the id"
        ) from e
    except (LocalEntryNotFoundError, FileNotFoundError) as e:
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.is_offline_mode()
            else f"the Hub ({constants.ENDPOINT}) cannot be reached"
        )
        raise CtxextError(
            f"Hub model '{repo_id}{at}' is not in the local Hugging Face cache (or only in part) and "
            f"{why}; download it on a connected machine (hf download {repo_id}) or pass a "
            "local folder"
        ) from e
    except EntryNotFoundError as e:
        raise CtxextError(
            f"Hub model '{repo_id}{at}' lacks a file ({e.__class__.__name__}); pass a complete "
            "model"
        ) from e
    except Exception as e:  # network errors of every flavour: say it in one line
        raise CtxextError(
            f"could not fetch Hub model '{repo_id}{at}' ({type(e).__name__}); check the network "
            "or set HF_HUB_OFFLINE=1 to use the cache"
        ) from e
