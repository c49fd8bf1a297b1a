"""The data flows one way: lower modules (the evaluation and its run included) never import the
CLI, the CLI's modules import no torch at import time, rendering never imports the recipe
runner or the fine-tune (the modelcard -> recipes -> modelcard cycle is gone), the schemas
import no pipeline, and no two modules import each other, at module level or inside functions.
Every module is imported first and alone (a cycle inside a package shows only when one of its
submodules is imported first); the import statements are also read from the source, functions
included."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FINETUNE = [
    "ctxext.finetune", "ctxext.finetune.data", "ctxext.finetune.episodes", "ctxext.finetune.export",
    "ctxext.finetune.loop", "ctxext.finetune.loss", "ctxext.finetune.mix", "ctxext.finetune.model",
    "ctxext.finetune.optim", "ctxext.finetune.parallel", "ctxext.finetune.samples", "ctxext.finetune.setup",
    "ctxext.finetune.state",
]  # fmt: skip
RECIPES = [
    "ctxext.recipes", "ctxext.recipes.loader", "ctxext.recipes.provenance",
    "ctxext.recipes.record", "ctxext.recipes.render", "ctxext.recipes.runner",
    "ctxext.recipes.schema",
]  # fmt: skip
EVALUATE = [
    "ctxext.evaluate", "ctxext.evaluate.context_use", "ctxext.evaluate.effective_length",
    "ctxext.evaluate.longppl", "ctxext.evaluate.loss", "ctxext.evaluate.needles",
    "ctxext.evaluate.passkey", "ctxext.evaluate.perplexity", "ctxext.evaluate.protocol",
    "ctxext.evaluate.reference", "ctxext.evaluate.retrieval", "ctxext.evaluate.run",
    "ctxext.evaluate.run_context", "ctxext.evaluate.scoring", "ctxext.evaluate.variants",
]  # fmt: skip
SPLIT = [
    *EVALUATE, "ctxext.rope",
    "ctxext.rope.formulas", "ctxext.rope.methods", "ctxext.rope.original", "ctxext.rope.read",
    "ctxext.rope.write",
    "ctxext.tune", "ctxext.tune.leaderboard", "ctxext.tune.run", "ctxext.tune.search",
]  # fmt: skip
REPORT = [
    "ctxext.report", "ctxext.report.cells", "ctxext.report.files", "ctxext.report.markdown",
    "ctxext.report.plots", "ctxext.report.summary", "ctxext.report.tables",
]  # fmt: skip
RESOURCES = [
    "ctxext.resources", "ctxext.resources.calibrate", "ctxext.resources.estimate",
    "ctxext.resources.guard", "ctxext.resources.memory", "ctxext.resources.probe",
    "ctxext.resources.shape", "ctxext.resources.threads", "ctxext.resources.timing",
]  # fmt: skip
LOWER = [
    "ctxext.bundled_train", "ctxext.checkpoint", "ctxext.config",
    "ctxext.corpus", "ctxext.data", "ctxext.extend", *FINETUNE, "ctxext.fsdp", "ctxext.hub",
    "ctxext.inspect", "ctxext.locate", "ctxext.modelcard", "ctxext.modeling", "ctxext.outputs",
    *RECIPES,
    *REPORT, *RESOURCES, *SPLIT, "ctxext.synthetic",
]  # fmt: skip
#: The command line: one module per command (`plan` is in the app, which it re-enters), the
#: pre-run check, shared options and progress bars.
CLI = [
    "ctxext.cli", "ctxext.cli.app", "ctxext.cli.eval", "ctxext.cli.extend",
    "ctxext.cli.finetune", "ctxext.cli.guard", "ctxext.cli.inspect", "ctxext.cli.options",
    "ctxext.cli.progress", "ctxext.cli.recipes", "ctxext.cli.tune",
]  # fmt: skip
#: Modules that must not import torch at import time (the CLI's --help stays instant).
NO_TORCH = ["ctxext.config", *FINETUNE, *RECIPES, *RESOURCES]


@pytest.fixture(scope="module")
def alone() -> dict[str, list[str]]:
    return _imported_alone(LOWER)


def _imported_alone(modules: list[str]) -> dict[str, list[str]]:
    """module -> the ctxext modules loaded by importing it alone.

    One interpreter: before each import every ctxext module is dropped from sys.modules, so
    each is imported as in a fresh interpreter (third-party modules stay cached, which changes
    nothing about which ctxext modules load). Also reports "torch" under the key "torch" when
    importing ``NO_TORCH`` first, alone, loaded torch.
    """
    code = (
        "import importlib, json, sys\n"
        "def drop():\n"
        "    for k in [k for k in sys.modules if k == 'ctxext' or k.startswith('ctxext.')]:\n"
        "        del sys.modules[k]\n"
        f"for m in {NO_TORCH!r}: importlib.import_module(m)\n"
        "out = {'torch': ['torch'] if 'torch' in sys.modules else []}\n"
        f"for m in {modules!r}:\n"
        "    drop()\n"
        "    importlib.import_module(m)\n"
        "    out[m] = sorted(k for k in sys.modules if k.startswith('ctxext.'))\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _under(loaded: list[str], *packages: str) -> list[str]:
    return [m for m in loaded if any(m == p or m.startswith(f"{p}.") for p in packages)]


def test_lower_modules_never_import_the_cli(alone):
    for module in LOWER:
        assert module in alone[module]
        assert not _under(alone[module], "ctxext.cli"), (module, alone[module])
        assert not [m for m in alone[module] if m.startswith("ctxext.cli_")], module


def test_rendering_does_not_import_the_recipe_runner_or_finetune(alone):
    for module in (*REPORT, "ctxext.modelcard"):
        assert not _under(alone[module], "ctxext.recipes", "ctxext.finetune"), alone[module]


def test_schemas_import_no_pipeline_and_packages_stay_light(alone):
    assert alone["torch"] == []  # config, finetune and recipes import no torch at import time
    assert not _under(alone["ctxext.config"], "ctxext.finetune", "ctxext.recipes")
    for module in ("ctxext.recipes.schema", "ctxext.recipes.loader"):
        assert not _under(alone[module], "ctxext.finetune"), (module, alone[module])
    for module in FINETUNE:
        assert not _under(alone[module], "ctxext.recipes"), (module, alone[module])
    assert alone["ctxext.finetune"] == ["ctxext.finetune"]  # __init__: a docstring only
    assert alone["ctxext.recipes"] == ["ctxext.recipes"]


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _imported_names(tree: ast.AST, type_checking: bool = False) -> Iterator[str]:
    """Every module an import statement anywhere in ``tree`` names: at module level and inside
    functions and methods (a function-level import runs on first use, and a cycle through one
    is a cycle all the same: only the order of first use decides whether it fails). Imports
    under ``if TYPE_CHECKING:`` never run (annotations only) and are skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node) and not type_checking:
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


def _import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    """ctxext module -> the ctxext modules it imports, read from the source (see
    :func:`_imported_names`).

    A package's __init__ re-exporting its own submodules, and a submodule's implicit import of
    its parent package, are how packages work, not edges of a cycle between modules.
    """
    import ctxext

    root = Path(ctxext.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for target in _imported_names(ast.parse(path.read_text()), type_checking):
            if target not in names or target == name:
                continue
            if is_package and target.startswith(f"{name}."):
                continue  # a package re-exporting its submodules
            if name.startswith(f"{target}."):
                continue  # a submodule and its parent package
            edges.add(target)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Depth-first search for a back edge: any cycle, of any length (None: none)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_import_cycle_between_modules():
    """Imports at module level and inside functions (a function-level import runs on first use:
    a cycle through one is a cycle all the same); not those under TYPE_CHECKING (see below)."""
    graph = _import_graph()
    assert graph.get("ctxext.rope.write")  # the parse sees module-level imports,
    assert "ctxext.cli.guard" in graph["ctxext.cli.eval"]  # those inside functions,
    assert "ctxext.recipes.loader" not in graph["ctxext.recipes.record"]  # not TYPE_CHECKING's
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_even_through_annotations():
    """Imports under ``if TYPE_CHECKING:`` never run, but two modules naming each other's types
    are still one design in two files: no cycle counting them either."""
    graph = _import_graph(type_checking=True)
    assert "ctxext.recipes.loader" in graph["ctxext.recipes.record"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle through annotations: " + " -> ".join(cycle or [])


def test_no_module_below_the_cli_imports_it_even_inside_a_function():
    graph = _import_graph()
    assert graph["ctxext.__main__"] == {"ctxext.cli.app"}  # `python -m ctxext`: above the CLI
    for module, targets in graph.items():
        if module != "ctxext.__main__" and not module.startswith("ctxext.cli"):
            assert not _under(sorted(targets), "ctxext.cli"), (module, targets)


def test_method_names_are_listed_once():
    """ctxext/rope/methods.py is the table of scaling methods: no other tuple, list or set of
    four or more of their names, and no help or message text naming four or more, in the
    source (docstrings aside). Tables keyed by method (one implementation each) are not lists;
    tune's default methods (config.TUNE_METHODS) are its search order, which a search's seeded
    draws follow."""
    import re

    import ctxext
    from ctxext.rope.methods import ALL_METHODS

    root = Path(ctxext.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        if where == "ctxext/rope/methods.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                items = [] if id(node) in docstrings else re.findall(r"[a-z0-9]+", node.value)
            else:
                continue
            if len(set(items) & set(ALL_METHODS)) >= 4:
                found.append(f"{where}:{node.lineno}")
    tune_order = next(
        f"ctxext/config/tune.py:{n.lineno}"
        for n in ast.parse((root / "config" / "tune.py").read_text()).body
        if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "TUNE_METHODS"
    )
    assert found == [tune_order]


def _heavy_imports(modules: list[str]) -> dict[str, list[str]]:
    """module -> which of torch, transformers and numpy are loaded after importing it alone.

    As in :func:`_imported_alone`, one interpreter imports the modules in turn, every ctxext
    module dropped from sys.modules before each. A library once loaded stays loaded, so the
    first module that loads one ends that interpreter's run, and the modules after it are
    imported in a fresh one: each result is the module's own."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for m in json.loads(sys.argv[1]):\n"
        "    for k in [k for k in sys.modules if k == 'ctxext' or k.startswith('ctxext.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
        "    out[m] = sorted(h for h in ('torch', 'transformers', 'numpy') if h in sys.modules)\n"
        "    if out[m]:\n"
        "        break\n"
        "print(json.dumps(out))"
    )
    found: dict[str, list[str]] = {}
    while len(found) < len(modules):
        rest = modules[len(found) :]
        res = subprocess.run(
            [sys.executable, "-c", code, json.dumps(rest)], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        found |= json.loads(res.stdout)
    return found


@pytest.fixture(scope="module")
def cli_heavy() -> dict[str, list[str]]:
    return _heavy_imports(CLI)


@pytest.mark.parametrize("module", CLI)
def test_cli_modules_import_alone_without_torch(module, cli_heavy):
    # `ctxext --help` stays instant: the commands import torch / transformers when they run.
    assert cli_heavy[module] == []


def test_rope_and_the_schemas_load_without_numpy_or_torch():
    """`extend` rewrites a config only: reading and writing one loads neither numpy nor torch
    (the float64 formulas load on use, for NTK's theta and `inspect`)."""
    code = (
        "import sys, ctxext.config, ctxext.rope\n"
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_one_place_for_the_device_choice_and_the_dtype_rule():
    """Only ctxext/device.py asks torch whether CUDA is there, or maps ``--dtype auto`` to a
    dtype (bf16 on CUDA, fp32 elsewhere); every other module asks it."""
    import re

    import ctxext

    root = Path(ctxext.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent).as_posix()
        text = path.read_text()
        if where != "ctxext/device.py" and (
            "cuda.is_available" in text or re.search(r"dtype\s*[!=]=\s*\"auto\"", text)
        ):
            found.append(where)
    assert found == []


def _ctxext_modules() -> Iterator[tuple[str, Path]]:
    import ctxext

    root = Path(ctxext.__file__).parent
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(root.parent).as_posix(), path


def _private_imports(where: str, tree: ast.AST) -> Iterator[str]:
    """``from ctxext.x import _name`` and ``module._name`` on an imported ctxext module (every
    import, functions and TYPE_CHECKING included; dunders such as ``__version__`` are public)."""
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    modules = set()  # local names bound to ctxext modules
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ctxext"):
            for alias in node.names:
                if private(alias.name):
                    yield f"{where}:{node.lineno} from {node.module} import {alias.name}"
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(a.asname for a in node.names if a.name.startswith("ctxext") and a.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and private(node.attr)
        ):
            yield f"{where}:{node.lineno} {node.value.id}.{node.attr}"


def test_no_module_imports_another_modules_private_name():
    """A name with a leading underscore belongs to its module: another module that needs it
    gets it public (or the code moves to where it is used)."""
    bad = "from ctxext.evaluate.loss import _head\nfrom ctxext import rope\nrope._x\n"
    assert len(list(_private_imports("x.py", ast.parse(bad)))) == 2
    found = [
        hit
        for where, path in _ctxext_modules()
        for hit in _private_imports(where, ast.parse(path.read_text()))
    ]
    assert found == []


def test_no_module_is_over_500_lines():
    """A module a reader can hold in mind: at most 500 lines (split by what the parts do)."""
    sizes = {where: len(path.read_text().splitlines()) for where, path in _ctxext_modules()}
    assert len(sizes) > 80  # every module of the package is checked
    over = {where: n for where, n in sizes.items() if n > 500}
    assert over == {}
