"""A busy machine: the thread wait policy the CLI applies (ctxext/resources/threads.py), a
calibration that cannot go stale silently (recorded load, the first steps checked against it,
--recalibrate), and `plan` stating the load now.

A calibration measured while other jobs ran used to be cached for good: `plan` then predicted
10.2 s per step where an idle step takes 0.6 s. Here one 20x too slow is planted in the
session's cache: a real fine-tune still runs, notices its steps are far faster than predicted,
and leaves a fresh measurement behind.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import run_cli, subprocess_env

from ctxext.resources import calibrate, threads


def _stale(calib, factor: float = 20.0, load: float = 9.0):
    """``calib`` as if measured on a machine ``factor`` times slower (a busy one)."""
    return dataclasses.replace(
        calib,
        matmul_flops={k: v / factor for k, v in calib.matmul_flops.items()},
        attention_flops={k: v / factor for k, v in calib.attention_flops.items()},
        bandwidth=calib.bandwidth / factor,
        op_seconds=calib.op_seconds * factor,
        load=load,
    )


@pytest.fixture
def planted(calibrated):
    """A stale calibration (20x too slow, measured at load 9) in place of the session's; the
    session's is put back afterwards."""
    stale = _stale(calibrated)
    calibrate.save_calibration(stale)
    assert calibrate.cached_calibration() == stale
    yield stale
    calibrate.save_calibration(calibrated)


def test_the_cli_sets_the_wait_policy_before_torch_starts():
    code = (
        "import os, sys\n"
        "from ctxext.cli.app import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in subprocess_env().items() if k not in threads._USER_KNOBS}
    # One of two processes of a launch on this machine: the cores are shared by construction.
    env["LOCAL_WORLD_SIZE"] = "2"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "PASSIVE"


def test_passive_only_where_the_cores_are_shared():
    env: dict[str, str] = {}
    said = threads.apply_policy(env, busy=False)
    assert env == {} and said["OMP_WAIT_POLICY"] == "unset" and "idle" in said["why"]
    assert threads.shared_now({"LOCAL_WORLD_SIZE": "2"})
    # Two other processes running flat out: seen as shared cores, whatever the load average.
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        import time

        time.sleep(0.3)
        assert threads.shared_now({})
    finally:
        for p in spin:
            p.kill()
            p.wait()


def test_a_users_own_wait_policy_is_kept():
    env = {"GOMP_SPINCOUNT": "1000"}
    assert threads.apply_policy(env, busy=True)["chosen_by"] == "user"
    assert env == {"GOMP_SPINCOUNT": "1000"}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.apply_policy(env, busy=True)["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    assert threads.apply_policy(env, busy=True)["chosen_by"] == "ctxext"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_the_fair_share():
    # The benchmark's load: 4 other threads beside our 2 on 2 cores: a third of the cores.
    assert threads.MachineLoad(4.0, 2, 2).slowdown == 3.0
    assert threads.MachineLoad(0.0, 2, 2).slowdown == 1.0
    assert threads.MachineLoad(0.0, 4, 2).slowdown == 1.0  # free cores: no slowdown
    assert not threads.MachineLoad(0.3, 2, 2).busy and threads.MachineLoad(4.0, 2, 2).busy


def test_the_calibration_records_its_load(calibration):
    assert calibration.load is not None and calibration.load >= 0
    assert calibration.threads is not None and calibration.threads >= 1


def test_a_stale_calibration_neither_refuses_a_run_nor_survives_it(planted, capsys, tmp_path):
    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "finetune", "-o", out, "-m", "yarn", "-f", "2",
                           "--train-length", "256", "--steps", "5", "--save-every", "0",
                           "--json")  # fmt: skip
    assert code == 0, err
    assert "re-measured the speeds, cache updated" in err, err
    assert "measured at load 9.0" in err
    fresh = calibrate.cached_calibration()
    assert fresh is not None and fresh.load is not None
    # The speeds were measured now: far above the planted ones (20x too slow), whatever the load.
    assert fresh.matmul_flops[1024] > 4 * planted.matmul_flops[1024]
    assert fresh.bandwidth > 4 * planted.bandwidth
    assert fresh.runtime == planted.runtime  # only the speeds are measured again
    rows = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_plan_states_the_load_now_and_the_calibrations(planted, capsys, tmp_path):
    code, out, err = run_cli(capsys, "plan", "finetune", "-o", tmp_path / "o", "-m", "yarn",
                             "-f", "2", "--steps", "5", "--json")  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    assert data["calibration_load"] == 9.0
    assert data["load"]["cores"] >= 1 and data["load"]["slowdown"] >= 1.0
    code, out, err = run_cli(capsys, "plan", "finetune", "-o", tmp_path / "o", "-m", "yarn",
                             "-f", "2", "--steps", "5")  # fmt: skip
    text = " ".join(out.split())
    assert "now: load" in text and "speeds measured at load 9.0" in text
    assert "--recalibrate when it is quiet" in text


def test_recalibrate_measures_again_at_once(planted, capsys, tmp_path):
    code, out, err = run_cli(capsys, "plan", "finetune", "-o", tmp_path / "o", "-m", "yarn",
                             "-f", "2", "--steps", "5", "--json", "--recalibrate")  # fmt: skip
    assert code == 0, err
    fresh = calibrate.cached_calibration()
    assert fresh.matmul_flops[1024] > 4 * planted.matmul_flops[1024]
    assert json.loads(out)["calibration_load"] == fresh.load != planted.load


def test_a_calibration_measured_at_todays_load_is_kept_when_the_estimate_is_off(calibrated):
    """Steps 10x faster than predicted, with the speeds measured under a load like now's: the
    estimate is what is off for this workload, so the speeds are not measured again (a tiny
    model's runs would otherwise pay a re-measure every time) and the cache is untouched."""
    from ctxext.resources.guard import CHECK_STEPS, StepCheck

    now = threads.machine_load()
    if now is None:
        pytest.skip("no load average on this platform")
    calib = dataclasses.replace(calibrated, load=now.average)
    calibrate.save_calibration(calib)
    check = StepCheck(lambda c: 10.0, calib)
    said = [check.observe(1.0) for _ in range(1 + CHECK_STEPS)]
    assert said[:-1] == [None] * CHECK_STEPS
    event, line = said[-1]
    assert event == "status" and "the estimate is off for this run, not the speeds" in line
    assert "calibration kept" in line and "re-measured" not in line
    assert calibrate.cached_calibration() == calib
