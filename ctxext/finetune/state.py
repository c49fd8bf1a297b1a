"""The work folder of a run: its identity, log, and resumable checkpoints (with manifests).

Checkpoints are written into ``checkpoints/.tmp-step-N`` and renamed when complete, so a
hard kill leaves either a complete checkpoint or a temporary folder that resuming ignores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxext.errors import CtxextError

#: progress(event, info): events "status" {message}, "packing" {source, done, total} (tokens
#: of training data packed), "start" {total, completed}, "step" (a log record),
#: "checkpoint" {step, path}, "warning" {message}.
ProgressFn = Callable[[str, dict[str, Any]], None]

WORK_SUFFIX = ".ctxext-work"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
#: Older complete checkpoints beyond this many are deleted (each holds optimizer state too).
KEEP_CHECKPOINTS = 2
MANIFEST_FILE = "manifest.json"


@dataclass
class TrainerState:
    """Where training stands; saved with every checkpoint (trainer_state.json)."""

    step: int = 0
    samples: int = 0  # data position: samples of the run consumed so far
    tokens: int = 0
    elapsed: float = 0.0
    resumed_from: int | None = None


def work_dir(out: Path) -> Path:
    """The sibling folder a run of ``out`` trains in (checkpoints, log)."""
    out = out.expanduser().absolute()
    return out.parent / f"{out.name}{WORK_SUFFIX}"


def newest_checkpoint(work: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary folders are ignored)."""
    folder = work / "checkpoints"
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return max(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def newest_intact_checkpoint(work: Path, report: ProgressFn | None = None) -> Path | None:
    """The newest complete checkpoint whose files match its manifest (sizes, sha256) and
    whose safetensors files are whole; each damaged newer one is reported and skipped."""
    folder = work / "checkpoints"
    done = sorted(
        (p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX))
        if folder.is_dir()
        else [],
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
        reverse=True,
    )
    skipped: list[str] = []
    for ckpt in done:
        if not (ckpt / STATE_FILE).is_file():
            continue
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if skipped and report is not None:
                report("warning", {"message": f"{'; '.join(skipped)}; resuming from {ckpt.name}"})
            return ckpt
        skipped.append(f"skipping damaged checkpoint {ckpt.name} ({problem})")
    if skipped:
        raise CtxextError(
            f"--resume: every checkpoint in {work} is damaged ({skipped[-1]}); start over "
            "with --overwrite"
        )
    return None


def _manifest(folder: Path) -> dict[str, Any]:
    from ctxext.checkpoint import file_sha256

    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in (MANIFEST_FILE, STATE_FILE):
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"files": files}


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None if it can): a file missing, of another size
    or hash than its manifest says, or a safetensors file whose header and size disagree."""
    from ctxext.checkpoint import file_sha256

    path = ckpt / MANIFEST_FILE
    listed: dict[str, Any] = {}
    if path.is_file():  # checkpoints of older versions have none: check what can be checked
        try:
            listed = json.loads(path.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST_FILE} is unreadable"
    for rel, want in listed.items():
        file = ckpt / rel
        if not file.is_file():
            return f"{rel} is missing"
        size = file.stat().st_size
        if size != want["size"]:
            return f"{rel} has {size:,} bytes, the manifest says {want['size']:,}"
    for file in sorted(ckpt.rglob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem is not None:
            return f"{file.relative_to(ckpt).as_posix()} {problem}"
    for rel, want in listed.items():  # sizes first: hashing is the slow part
        if file_sha256(ckpt / rel) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensor data;
    the last tensor's end offset must be exactly where the file ends."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"is truncated ({size:,} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return "has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is truncated ({size:,} of {expected:,} bytes)"
    return None


def create_work_dir(acc: Any, work: Path, out: Path, identity: dict[str, Any]) -> None:
    """A fresh work folder for the output ``out`` (replacing one without checkpoints, or any
    with --overwrite)."""
    if acc.is_main_process:
        if work.exists():
            shutil.rmtree(work)
        (work / "checkpoints").mkdir(parents=True)
        _write_json_atomic(work / RUN_FILE, {"identity": identity, "output": str(out)})
    acc.wait_for_everyone()


def check_same_run(work: Path, now: dict[str, Any]) -> None:
    """--resume must repeat the run's options: name the first one that differs."""
    run_file = work / RUN_FILE
    before = json.loads(run_file.read_text())["identity"] if run_file.is_file() else {}
    flat_before, flat_now = _flatten(before), _flatten(now)
    for key in sorted(set(flat_before) | set(flat_now)):
        if flat_before.get(key) != flat_now.get(key):
            raise CtxextError(
                f"--resume: the run in {work} was started with {key}={flat_before.get(key)!r}, "
                f"not {flat_now.get(key)!r}; repeat its options or pass --overwrite to start over"
            )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_checkpoint(acc: Any, work: Path, state: TrainerState) -> Path:
    """accelerate's save_state into a temporary folder, renamed when every process is done."""
    folder = work / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{state.step:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    with _quiet_tied_weights():
        acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        # Sizes and hashes of every file, so a resume can tell a damaged checkpoint.
        _write_json_atomic(tmp / MANIFEST_FILE, _manifest(tmp))
        saved = {k: v for k, v in state.__dict__.items() if k != "resumed_from"}
        _write_json_atomic(tmp / STATE_FILE, saved)
        _fsync_dir(tmp)
        if final.exists():  # left over from an attempt that got further than this one
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(folder)
        _prune_checkpoints(folder)
    acc.wait_for_everyone()
    return final


#: The logger of accelerate's safetensors writer (accelerate.utils.other).
_ACCELERATE_SAVE_LOGGER = "accelerate.utils.other"


class _TiedWeightsFilter(logging.Filter):
    """Drops accelerate's "Removed shared tensor {'lm_head.weight'} while saving" record.

    A model with tied input and output embeddings holds one tensor under two names;
    safetensors stores it once and accelerate says so at every checkpoint. Nothing is lost:
    the model that loads the checkpoint ties the two names again (tests/test_finetune_state.py
    checks that a resumed model has the saved weights, tied).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextlib.contextmanager
def _quiet_tied_weights() -> Iterator[None]:
    logger = logging.getLogger(_ACCELERATE_SAVE_LOGGER)
    note = _TiedWeightsFilter()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def _prune_checkpoints(folder: Path) -> None:
    done = sorted(
        (p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)),
        key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)),
    )
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trim_log(path: Path, step: int) -> None:
    """Drop log lines after the checkpoint we resume from (those steps are trained again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut short by a kill: everything after it is gone too
    path.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


def read_log(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a training_log.jsonl / log.jsonl."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
