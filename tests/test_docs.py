"""README and docs/: the test command is the one CI runs, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _code_lines(path: Path) -> list[str]:
    """Lines inside the file's fenced code blocks (``` ... ```)."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line.strip())
    return lines


def test_readme_test_command_is_what_ci_runs():
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_test = next(ln for ln in ci if "pytest" in ln and not ln.startswith("#"))
    ci_torch = next(ln for ln in ci if "pip install" in ln and "torch==" in ln)
    readme = _code_lines(ROOT / "README.md")
    assert ci_test in readme, f"README must show .ci/run's test command: {ci_test}"
    pin = re.search(r"torch==\S+", ci_torch).group()
    torch_lines = [ln for ln in readme if "torch==" in ln]
    assert torch_lines and all(re.search(r"torch==\S+", ln).group() == pin for ln in torch_lines)
    # torch comes first, as in .ci/run: the README's block installs it before ctxext.
    assert readme.index(f"pip install {pin}") < readme.index(ci_test)
    # README says which of its torch lines CI runs (the one that needs only the registry).
    prose = " ".join((ROOT / "README.md").read_text().split())
    assert f"CI (`.ci/run`) runs the first line, `pip install {pin}`" in prose
    assert f"`{ci_torch.replace('python -m ', '').replace(' -q', '')}`" in prose


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {
        _slug(line.lstrip("#"))
        for line in path.read_text().splitlines()
        if line.startswith("#") and line not in _code_lines(path)
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{doc.name}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{doc.name}: no heading for #{anchor} in {dest.name}"


def test_slug_matches_github():
    assert (
        _slug(" `ctxext plan`'s predictions vs measured") == "ctxext-plans-predictions-vs-measured"
    )
    assert _slug(" Scaling out: `accelerate launch`") == "scaling-out-accelerate-launch"
