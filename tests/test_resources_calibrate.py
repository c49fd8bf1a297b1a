"""Measuring this machine (ctxext/resources/calibrate.py) under a launcher, and where its cache
lives.

`accelerate launch ... -m ctxext finetune` on a machine without a calibration cache used to hang
for 5 minutes: rank 0's runtime probe (a subprocess) inherited the launcher's RANK, WORLD_SIZE
and MASTER_ADDR/PORT, so its fine-tune joined the run's process group and waited for a rank 1
that never came, until killed. The session's calibration (conftest ``calibration``) is measured
with those variables set, as rank 0 measures it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import launcher_env

from ctxext.config import EvalConfig
from ctxext.locate import resolve_model
from ctxext.resources import calibrate, guard


def test_tests_never_touch_the_user_cache():
    # conftest points $CTXEXT_CACHE_DIR at a folder of this session (subprocesses inherit it).
    assert calibrate.cache_dir() != Path.home() / ".cache" / "ctxext"
    assert "ctxext-cache" in calibrate.cache_dir().name


def test_rank_0_measures_with_a_plain_runtime_probe(calibrated):
    """Measured under the launcher's variables, with the port they name taken: a probe that
    inherited them fails at once (address in use); a plain one measures and the result is
    cached for the run's own check."""
    assert set(calibrated.runtime) == {"eval", "finetune", "lora"}
    assert all(2**26 < v < 2**33 for v in calibrated.runtime.values())  # 64 MiB .. 8 GiB
    assert calibrate.cached_calibration() == calibrated


def test_other_ranks_never_measure(monkeypatch, tmp_path):
    """With no cache, a rank other than 0 checks with the pessimistic guess at once: it neither
    measures (rank 0 does) nor writes the cache."""
    monkeypatch.setenv("CTXEXT_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv("CTXEXT_MEMORY_LIMIT", raising=False)
    for key, value in launcher_env(rank=1, port=29500).items():
        monkeypatch.setenv(key, value)

    def status(message: str):  # entered just before the machine would be measured
        raise AssertionError(f"rank 1 started measuring: {message}")

    run = guard.eval_workloads([resolve_model(None)], EvalConfig(lengths=[256, 1024]), None)
    verdict = guard.assess(run, None, measure=True, status=status)
    assert verdict.calib is calibrate.PESSIMISTIC
    assert not (tmp_path / "empty").exists()


def test_a_plain_process_measures_when_asked(monkeypatch, tmp_path):
    # The control for the test above: the same call without the launcher's variables measures
    # (the status is entered; raising there stops it before the slow part).
    monkeypatch.setenv("CTXEXT_CACHE_DIR", str(tmp_path / "empty"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)

    class Measured(Exception):
        pass

    def status(message: str):
        raise Measured(message)

    run = guard.eval_workloads([resolve_model(None)], EvalConfig(lengths=[256, 1024]), None)
    with pytest.raises(Measured, match="measuring this machine"):
        guard.assess(run, None, measure=True, status=status)
