"""Every RoPE architecture through every command, fp32 and bf16 (benchmarks/arch_matrix.py):
one test per model type on one tiny checkpoint built from its config class, then the shipped
support table (docs/architectures.md) checked against what the matrix found.

The matrix runs under a fixed calibration (``arch_matrix.fixed_calibration``) in a cache of
its own: ``plan`` and the pre-run checks are exercised per architecture without measuring this
machine, which tests/test_resources_calibrate.py and test_resources_load.py do."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from ctxext.rope.read import _ROPE

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "arch_matrix.py"
_SPEC = importlib.util.spec_from_file_location("arch_matrix", _PATH)
matrix = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(matrix)

FOUND: dict[str, dict[str, str]] = {}  # filled by the per-type tests, read by the table test
SLIDING = ("mistral", "mixtral", "qwen2", "gemma2", "gemma3_text", "starcoder2")


@pytest.fixture(scope="module")
def matrix_data(tmp_path_factory) -> Path:
    """The matrix's text data, and its fixed calibration as this module's cached one; one
    torch thread while it runs (tiny ops: a second thread only waits for the first, spinning
    unless the CLI's wait policy was set before torch started, which pytest's process lacks)."""
    import torch

    from ctxext.resources import calibrate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(calibrate.CACHE_ENV, str(tmp_path_factory.mktemp("arch-cache")))
        mp.delenv(calibrate.MEMORY_LIMIT_ENV, raising=False)
        calibrate.save_calibration(matrix.fixed_calibration())
        yield matrix.text_data(tmp_path_factory.mktemp("arch-data"))
    torch.set_num_threads(threads)


def test_every_listed_rope_type_is_in_the_matrix():
    assert set(matrix.TYPES) | set(matrix.NOT_BUILT) == set(_ROPE)


@pytest.mark.parametrize("model_type", list(matrix.TYPES))
def test_architecture_through_every_command(model_type, tmp_path, matrix_data):
    src = matrix.build(model_type, tmp_path / "model")
    result = matrix.run_type(model_type, src, tmp_path, matrix_data)
    cells = result["cells"]
    refused = {c: v for c, v in cells.items() if v != "works"}
    if model_type in ("phi3", "phimoe"):  # fixed longrope factors cannot express dynamic NTK
        assert set(refused) == {"extend dynamic"} and "longrope" in refused["extend dynamic"]
    else:
        assert not refused
    length = str(matrix.LENGTH)
    fp32, bf16 = (result["runs"][d]["ppl"][length]["ppl"] for d in ("float32", "bfloat16"))
    assert math.isclose(fp32, bf16, rel_tol=0.05), (fp32, bf16)  # a random model: loose
    window = result["runs"]["float32"]["sliding_window"]
    if model_type in SLIDING:
        assert window and f"{matrix.WINDOW} tokens only" in window["note"], window
    else:
        assert window is None
    FOUND[model_type] = cells


def test_a_sliding_window_is_reported_only_where_it_is_shorter_than_a_length():
    from ctxext.report.cells import sliding_window_lines
    from ctxext.rope.read import sliding_window

    config = {"model_type": "mistral", "num_hidden_layers": 2, "sliding_window": 4096}
    runs = [{"model": name, "sliding_window": sliding_window(config, 8192)} for name in ("m", "m")]
    (line,) = sliding_window_lines({"config": {"lengths": [2048, 8192]}, "runs": runs})
    assert line.startswith("m: at 8192 tokens, 2 of 2 layers attend to the last 4096 tokens")
    runs = [{"model": "m", "sliding_window": sliding_window(config, 4096)}]
    assert sliding_window_lines({"config": {"lengths": [4096]}, "runs": runs}) == []


def test_shipped_support_table_is_what_the_matrix_finds():
    missing = set(matrix.TYPES) - set(FOUND)
    if missing:
        pytest.skip(f"the matrix did not run for {sorted(missing)} in this session")
    assert matrix.TABLE.read_text() == matrix.render(FOUND), (
        "docs/architectures.md is stale: run python benchmarks/arch_matrix.py"
    )
