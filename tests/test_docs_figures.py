"""Claims follow the files: every figure table in README.md and docs/*.md is regenerated from the
shipped results file it names (benchmarks/doc_tables.py) and must equal it, and the headline
claims written in prose are checked against every evaluation set the docs show."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "benchmarks/doc_tables.py")
doc_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_tables)

#: The headline tables each document must carry (kind and results files).
REQUIRED = {
    "README.md": ["run docs/tiny-yarn/results.json"],
    "docs/bundled-model.md": [
        "ppl docs/eval-bundled/results.json",
        "buckets docs/eval-bundled/results.json",
        "context-use docs/context-use-bundled/results.json docs/context-use-tiny-yarn/results.json",
        "families docs/context-use-bundled/results.json docs/context-use-tiny-yarn/results.json",
    ],
}


@pytest.mark.parametrize("doc", doc_tables.DOCS, ids=lambda p: p.name)
def test_every_table_equals_its_results_file(doc: Path):
    for spec, body in doc_tables.blocks(doc.read_text()):
        assert body == doc_tables.render(spec), (
            f"{doc.name}: the table '{spec}' differs from its results file; "
            "run python benchmarks/doc_tables.py"
        )


def test_headline_tables_are_generated_blocks():
    for name, specs in REQUIRED.items():
        present = [spec for spec, _ in doc_tables.blocks((ROOT / name).read_text())]
        for spec in specs:
            assert spec in present, (name, spec)


def test_a_changed_digit_is_caught():
    spec = REQUIRED["docs/bundled-model.md"][0]
    body = doc_tables.render(spec)
    planted = body.replace(".", ",", 1)
    text = f"x\n<!-- table: {spec} -->\n{planted}<!-- /table -->\n"
    ((got_spec, got_body),) = doc_tables.blocks(text)
    assert got_spec == spec and got_body != doc_tables.render(spec)
    assert doc_tables.rewrite(text) == f"x\n<!-- table: {spec} -->\n{body}<!-- /table -->\n"


def _runs(path: str) -> list[dict]:
    return json.loads((ROOT / path).read_text())["runs"]
