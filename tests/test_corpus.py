"""The stdlib corpus (ctxext/corpus.py): which files it reads and in what order."""

from __future__ import annotations

from pathlib import Path

from ctxext.corpus import split_of, stdlib_documents


def test_skipped_folders_and_order(tmp_path: Path):
    files = {
        "b.py": "b", "a/z.py": "az", "x1/sub/c.py": "abc", "x1-a.py": "dash", "x1/a.py": "x1a",
        "empty.py": "  \n",
        "notes.txt": "not python", "site-packages/pkg.py": "x", "test/t.py": "x",
        "tests/t.py": "x", "a/testing/t.py": "x", "idlelib/idle_test/t.py": "x",
        "__pycache__/c.py": "x", "idlelib/run.py": "idle",
    }  # fmt: skip
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    # Sorted as paths (by their parts): x1/a.py before x1-a.py, though "-" < "/" as text;
    # x1/a.py and x1-a.py fall in the same split (train).
    kept = ["a/z.py", "b.py", "idlelib/run.py", "x1/a.py", "x1/sub/c.py", "x1-a.py"]
    got = {
        split: [d.name for d in stdlib_documents(split, tmp_path)] for split in ("train", "heldout")
    }
    for split, names in got.items():
        assert names == [n for n in kept if split_of(n) == split]
    assert sorted(got["train"] + got["heldout"]) == sorted(kept)
    assert got["train"].index("x1/a.py") < got["train"].index("x1-a.py")
    doc = next(
        d for s in ("train", "heldout") for d in stdlib_documents(s, tmp_path) if d.name == "a/z.py"
    )
    assert doc.text == "az"
