"""The default corpus: the Python standard library's own source files.

Every machine that runs ctxext has them, so the bundled model can be trained and evaluated
anywhere without a network. Files are split deterministically *by path* (a hash of the path
relative to the stdlib root), so the same file always lands in the same part on every machine
and the held-out part never leaks into training. The stdlib differs slightly between Python
versions, so results carry a fingerprint of the documents they used.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]

#: One file in HELDOUT_MODULUS goes to the held-out part.
HELDOUT_MODULUS = 10

# Test suites are absent from some distributions (Debian ships them separately), and
# site-packages is not the stdlib: skipping both keeps the corpus the same everywhere.
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Document:
    """One text document with a stable name (used for fingerprints and reports)."""

    name: str
    text: str


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> Split:
    """The part a stdlib file belongs to, from a hash of its relative POSIX path."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % HELDOUT_MODULUS == 0 else "train"


def _python_files(base: Path) -> list[Path]:
    """The ``.py`` files under ``base`` outside skipped folders, relative, sorted by path.

    The skipped folders are pruned while walking: globbing the whole tree and filtering
    afterwards visits every file of site-packages and the test suites (~50x slower).
    """
    found = []
    for folder, dirs, files in os.walk(base, followlinks=True):
        rel = Path(folder).relative_to(base)
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith("test")]
        found += [rel / name for name in files if name.endswith(".py")]
    return sorted(found)


def stdlib_documents(split: Split, root: Path | None = None) -> Iterator[Document]:
    """Yield the stdlib ``.py`` files of one split, sorted by path (deterministic order)."""
    base = root or stdlib_root()
    for rel in _python_files(base):
        if split_of(rel.as_posix()) != split:
            continue
        try:
            text = (base / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield Document(name=rel.as_posix(), text=text)
