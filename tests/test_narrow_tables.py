"""Tables readable at 80 columns (the width of a console that is not a terminal): no cell cut
with "…", model ids, lengths and paths whole or broken where a reader expects it."""

from __future__ import annotations

import shutil

from conftest import BUNDLED, run_cli

from ctxext.recipes.loader import load_recipe, shipped_recipes


def test_recipes_list_keeps_model_ids_and_lengths_whole(capsys):
    code, out, err = run_cli(capsys, "recipes", "list")
    assert code == 0, err
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out
    cells = " ".join(line.strip("│ ") for line in out.splitlines())
    for name in shipped_recipes():
        recipe = load_recipe(name).recipe
        assert f"{name} " in cells and (recipe.model or "stdlib-llama") in out, name
        for n in recipe.eval.lengths if recipe.eval else []:
            assert f" {n}" in cells, (name, n)  # "131072", never "1310…" or "131\n072"


def test_inspect_breaks_a_long_path_after_a_slash(capsys, tmp_path):
    from ctxext.inspect import fold_path

    deep = tmp_path / "a-rather-long-folder-name" / "and-another-long-one" / "stdlib-llama"
    shutil.copytree(BUNDLED, deep, ignore=shutil.ignore_patterns("*.safetensors"))
    code, out, err = run_cli(capsys, "inspect", deep)
    assert code == 0, err
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out
    block = out[out.index("  path") : out.index("  model_type")].splitlines()
    pieces = [block[0].split(None, 1)[1].strip(), *(line.strip() for line in block[1:])]
    assert "".join(pieces) == str(deep), pieces
    assert all(p.endswith("/") for p in pieces[:-1]), pieces  # broken after a "/" only
    assert fold_path("/a/bb/ccc", 5) == "/a/\nbb/\nccc"
