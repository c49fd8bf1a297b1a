"""Checkpoint I/O: find a model, read its config, and write output folders atomically.

Nothing here loads weights. Output folders are built in a temporary sibling and renamed
into place only when complete, so a reader (or a crash) never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ctxext.errors import CtxextError, ResourceError

LinkMode = Literal["hardlink", "copy", "symlink"]

#: Short names for the models that ship inside the package.
BUNDLED_MODELS = {"stdlib-llama": "stdlib-llama"}
DEFAULT_MODEL = "stdlib-llama"
PROVENANCE_FILE = "ctxext_provenance.json"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Files `extend` rewrites instead of linking.
REWRITTEN_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


#: What a command needs from a model: its config (inspect, extend --dry-run, pre-flight
#: checks), also its tokenizer (tokenizing data before any weight is fetched), or everything
#: needed to load it (extend, eval, finetune).
Need = Literal["config", "tokenizer", "weights"]
#: progress(description, total_bytes) -> update(bytes_done): one bar per weight file.
DownloadProgress = Callable[[str, int], Callable[[int], None]]

#: The small files the config-only commands read (only those a repo has are fetched).
CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
_TOKENIZER_FILES = (
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
    ``need`` asks for (see :func:`select_hub_files`): a config-only command never downloads a
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
    hub = ResolvedModel(name, Path(), "hub-cache", repo_id=repo_id, revision=revision or None)
    return fetch(hub, need, allow_pickle=allow_pickle, progress=progress)


def fetch(
    model: ResolvedModel,
    need: Need,
    *,
    allow_pickle: bool = False,
    progress: DownloadProgress | None = None,
) -> ResolvedModel:
    """Make sure ``need``'s files of a resolved model are on disk (a no-op for folders)."""
    if model.repo_id is None:
        return model
    with _hub_errors(model.repo_id, model.revision):
        # The config files first, always: they resolve the revision to a commit (recorded in
        # the cache's refs/ for offline use) and cache the repository's file listing. Once the
        # commit is known it is used: a branch that moves meanwhile cannot mix two commits.
        revision = model.commit or model.revision
        path = _snapshot(model.repo_id, revision, list(CONFIG_FILES))
        commit = path.name
        files = [f for f in CONFIG_FILES if (path / f).is_file()]
        if need != "config":
            listing = _repo_listing(model.repo_id, commit, path)
            files = select_hub_files(listing, need, allow_pickle, model.repo_id)
            for file in files:
                _download(model.repo_id, commit, file, progress if _is_weight(file) else None)
    return ResolvedModel(
        model.name, path, "hub-cache", model.repo_id, model.revision, commit, tuple(files)
    )


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
    chosen += [f for f in top if f in _TOKENIZER_FILES or f.endswith(".tiktoken")]
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
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
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


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with a one-line error naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CtxextError(f"{path} not found; {what}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CtxextError(f"{path} is not valid JSON ({e}); restore the original file") from e
    if not isinstance(data, dict):
        raise CtxextError(f"{path} is not a JSON object; restore the original file")
    return data


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model folder, checked to be a transformers model config."""
    config = read_json(
        model_dir / "config.json",
        "this folder is not a Hugging Face model (pass the folder that holds config.json)",
    )
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CtxextError(
            f"{model_dir / 'config.json'} has no model_type; it is not a transformers model "
            "config (restore the original config.json)"
        )
    return config


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    names = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
    return sorted({p for pattern in names for p in model_dir.glob(pattern)})


def weights_readable(model_dir: Path) -> bool:
    """Whether every safetensors file of ``model_dir`` opens (header and sizes consistent) and no
    weight file is empty: False points at truncated or corrupted files, True at another cause."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        if path.stat().st_size == 0:
            return False
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception:  # safetensors raises its own error types
                return False
    return True


def check_output_path(out: Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse output folders that would destroy something or could not be written."""
    out = out.expanduser().absolute()
    for src in inputs:
        src = src.resolve()
        if out.resolve() == src or src in out.resolve().parents:
            raise CtxextError(
                f"output {out} is inside the input folder {src}; choose a folder outside it"
            )
        if out.resolve() in src.parents:
            raise CtxextError(f"output {out} contains the input folder {src}; choose another")
    if out.exists() and not out.is_dir():
        raise CtxextError(f"output {out} exists and is a file; choose another output folder")
    if out.exists() and not overwrite:
        raise CtxextError(f"output folder {out} already exists; pass --overwrite to replace it")
    # Missing parent folders are created when the output is written (as save_pretrained and
    # `mkdir -p` do); what must hold now is that the nearest existing one is a writable folder.
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CtxextError(f"{parent} is a file, so {out} cannot be created; choose another")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CtxextError(f"cannot write in {parent}; choose a writable output location")
    return out


LOCK_SUFFIX = ".lock"


def lock_path(out: Path) -> Path:
    """The lock file of output ``out``: a hidden sibling, ``.OUT.lock``."""
    out = out.expanduser().absolute()
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the one-writer lock of ``out`` (an exclusive flock on ``.OUT.lock``) meanwhile.

    A second process aimed at the same output is refused with one line naming the holder. The
    kernel drops a flock when its process dies, so the lock file a killed run leaves behind is
    stale and simply taken over; stale temporaries of killed runs are then cleaned up (see
    :func:`remove_stale_temporaries`). The file is removed when the holder is done.
    """
    import fcntl

    path = lock_path(out)
    if not _can_create_in(path.parent):
        # An output that cannot be written: the command's own output checks say why, in one
        # line (and there is nothing to protect).
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CtxextError(
                f"{out} is being written by another ctxext run ({holder}); wait for it to "
                f"finish or stop it (lock file {path})"
            ) from None
        # The holder we waited on may have removed the file: lock the file at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {platform.node()}".encode())
        remove_stale_temporaries(out.expanduser().absolute())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _can_create_in(folder: Path) -> bool:
    """Whether ``folder`` exists writable, or could be made under a writable folder."""
    while not folder.exists():
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out`` in one rename.

    On any failure (including Ctrl-C) the temporary folder is removed and ``out`` is left as
    it was. A disk-full error is turned into a one-line ResourceError (exit code 1).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    # mkdtemp makes the folder private (0700); the output should get the permissions any
    # folder the user creates gets (0777 minus the umask), as `mkdir` would give it.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(
                f"no space left on the device while writing {out}; nothing was written, "
                "free some space and retry"
            ) from e
        raise


def remove_stale_temporaries(out: Path) -> None:
    """Clean up after runs that were killed (their process is gone).

    Temporary siblings (``.OUT.tmp-PID-*``) are deleted. A ``.OUT.old-PID-*`` folder is what
    --overwrite moved aside: if the kill came between its two renames OUT is missing, and the
    old folder is put back (the replacement never completed); otherwise it is deleted.
    """
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        if _dead_owner(tmp, f".{out.name}.tmp-"):
            shutil.rmtree(tmp, ignore_errors=True)
    for trash in out.parent.glob(f".{out.name}.old-*"):
        if not _dead_owner(trash, f".{out.name}.old-"):
            continue
        if not out.exists() and (trash / "old").is_dir():
            os.rename(trash / "old", out)
        shutil.rmtree(trash, ignore_errors=True)


def _dead_owner(path: Path, prefix: str) -> bool:
    pid = path.name.removeprefix(prefix).split("-")[0]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and deleted after."""
    if not out.exists():
        os.rename(tmp, out)
        return
    # The pid in the name lets a later run recognise it as stale (see remove_stale_temporaries).
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, trash / "old")
    os.rename(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def place_file(src: Path, dst: Path, mode: LinkMode) -> str:
    """Put ``src`` at ``dst`` by hard link, copy or symlink; returns the mode actually used.

    Hub-cache files are symlinks into blobs/: we link to the real file. A hard link that is
    impossible (another filesystem, no permission) falls back to a copy.
    """
    real = src.resolve()
    if mode == "symlink":
        os.symlink(real, dst)
        return "symlink"
    if mode == "hardlink":
        try:
            os.link(real, dst)
            return "hardlink"
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
    shutil.copy2(real, dst)
    return "copy"


def link_model_files(
    src: Path,
    dst: Path,
    mode: LinkMode,
    skip: tuple[str, ...],
    only: tuple[str, ...] | None = None,
) -> dict:
    """Place every file of the model folder in ``dst`` except ``skip``; returns name -> mode.

    ``only`` limits it to those files (a Hub snapshot folder may also hold files other tools
    downloaded, such as ``*.bin`` or ``original/``, which must not reach the output).
    """
    placed: dict[str, str] = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.as_posix() in skip or any(p.startswith(".") for p in rel.parts):
            continue
        if only is not None and rel.as_posix() not in only:
            continue
        if path.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        placed[rel.as_posix()] = place_file(path, target, mode)
    return placed


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def versions() -> dict[str, str]:
    """Versions of the libraries that decide what a result means."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ctxext", "transformers", "torch", "accelerate", "peft", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
