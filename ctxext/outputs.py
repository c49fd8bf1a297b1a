"""Writing output folders: refuse destructive ones, one writer at a time, and atomically.

Output folders are built in a temporary sibling and renamed into place only when complete,
so a reader (or a crash) never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from ctxext.errors import CtxextError, ResourceError

LinkMode = Literal["hardlink", "copy", "symlink"]


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
