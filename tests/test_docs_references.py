"""README.md and docs/*.md point at things that exist: every repository path named (files,
folders, globs), every `ctxext.module` (and `ctxext.module.name`), and every `--flag` (accepted
by a ctxext command or by a script of this repository; other tools' flags are listed below by
tool). Relative links and their #anchors: tests/test_docs.py.

The checks are functions of a document's text, so the test can also watch them fail on a
planted dead reference.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Flags of other programs that the docs show in their command lines.
OTHER_TOOLS = {
    "accelerate launch": {
        "--config_file", "--multi_gpu", "--num_processes", "--machine_rank",
        "--main_process_ip", "--num_cpu_threads_per_process", "--cpu",
    },
    "pip install": {"--index-url", "--no-binary", "--no-deps"},
    "ruff format": {"--check"},
}  # fmt: skip
#: ctxext's own flags that are read before the Typer app parses (ctxext/cli/app.py).
GLOBAL_FLAGS = {"--debug", "--help"}

_TOP = r"(?:ctxext|tests|benchmarks|docs|recipes|\.ci)"
_PATH = re.compile(rf"(?<![\w./-])((?:\.\./)*{_TOP}/[\w./*-]*)")
_MODULE = re.compile(r"(?<![\w./-])ctxext(?:\.[A-Za-z_]\w*)+")
_FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*[a-z0-9]")


def _exists(base: Path, ref: str) -> bool:
    ref = ref.rstrip(".,:;")
    if any(c in ref for c in "*?["):
        return any(base.glob(ref))
    return (base / ref).exists()


def dead_paths(text: str, doc: Path) -> list[str]:
    """Repository paths in ``text`` (plain or in links) that point at nothing; relative links
    and their anchors are checked by tests/test_docs.py."""
    dead = []
    for ref in _PATH.findall(text):
        base = doc.parent if ref.startswith("../") else ROOT
        if not _exists(base, ref):
            dead.append(ref)
    return dead


def _module_names(module: Path) -> set[str]:
    tree = ast.parse(module.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dead_modules(text: str) -> list[str]:
    """``ctxext.a.b`` (a module, or a module and one name defined in it) that do not exist."""
    dead = []
    for ref in _MODULE.findall(text):
        parts = ref.rstrip(".").split(".")
        for cut in range(len(parts), 0, -1):
            folder = ROOT.joinpath(*parts[:cut])
            module = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
            if module.is_file():
                rest = parts[cut:]
                ok = not rest or (len(rest) == 1 and rest[0] in _module_names(module))
                if not ok and folder.is_dir():
                    ok = len(rest) == 1 and (folder / rest[0]).exists()
                break
        else:
            ok = False
        if not ok:
            dead.append(ref)
    return dead


def ctxext_flags() -> set[str]:
    """Every --option of every ctxext command (hidden ones included), from the Typer app."""
    import typer.main

    from ctxext.cli.app import app

    flags: set[str] = set()

    def walk(command) -> None:
        for param in command.params:
            if getattr(param, "param_type_name", "") == "option":
                opts = [*param.opts, *param.secondary_opts]
                flags.update(o for o in opts if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return flags


def script_flags() -> set[str]:
    """The flags of this repository's argparse scripts (benchmarks, the bundled trainer)."""
    flags: set[str] = set()
    for path in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("ctxext/**/*.py")]:
        text = path.read_text()
        if "add_argument" in text:
            flags.update(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", text))
    return flags


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    return ctxext_flags() | script_flags() | GLOBAL_FLAGS | set().union(*OTHER_TOOLS.values())


def dead_flags(text: str, known: set[str]) -> list[str]:
    return sorted({f for f in _FLAG.findall(text) if f not in known})


def test_global_flags_are_read_by_the_app():
    source = (ROOT / "ctxext" / "cli" / "app.py").read_text()
    assert '"--debug"' in source


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_path_module_and_flag_named_exists(doc, known_flags):
    text = doc.read_text()
    dead = {
        "paths": dead_paths(text, doc),
        "modules": dead_modules(text),
        "flags": dead_flags(text, known_flags),
    }
    assert dead == {"paths": [], "modules": [], "flags": []}


def test_planted_dead_references_are_caught(known_flags):
    doc = ROOT / "docs" / "commands.md"
    planted = (
        "See `ctxext/plan.py`, [t](../tests/test_nothing_here.py), `docs/nothing-*`, "
        "`ctxext.nowhere`, ctxext.errors.NoSuchError and --no-such-flag."
    )
    assert dead_paths(planted, doc) == [
        "ctxext/plan.py",
        "../tests/test_nothing_here.py",
        "docs/nothing-*",
    ]
    assert dead_modules(planted) == ["ctxext.nowhere", "ctxext.errors.NoSuchError"]
    assert dead_flags(planted, known_flags) == ["--no-such-flag"]
    alive = (
        "See ctxext/cli/progress.py, docs/tune-*, [c](../tests/conftest.py), ctxext.errors.CtxextError, "
        "ctxext.rope.formulas and --retrieval-template."
    )
    assert dead_paths(alive, doc) == [] and dead_modules(alive) == []
    assert dead_flags(alive, known_flags) == []
