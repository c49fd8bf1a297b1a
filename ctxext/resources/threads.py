"""How torch's CPU threads share the cores: the wait policy the CLI applies at start, and the
machine's load now (what ``ctxext plan`` scales its time by). No torch at import time.

torch's CPU kernels (ATen, MKL, oneDNN) run on one OpenMP pool; the Linux wheels ship libgomp.
By default a libgomp thread that has finished its share of a parallel region spins (300,000
polls) before it sleeps, waiting for the next region or for the other threads at the barrier.
Alone on the machine that is fast; beside other jobs a spinning thread burns the time slice
that the thread it waits for needs, and a 2-thread fine-tune step of the bundled model ran
5-11x slower beside two 2-thread torch jobs, where the fair share is 3x.
``OMP_WAIT_POLICY=PASSIVE`` makes a waiting thread sleep at once (libgomp: no spinning; LLVM's
libomp: a block time of 0). ``benchmarks/bench_load.py`` measures it idle and beside such a
load (docs/benchmarks.md). On a shared 2-core machine it was several times faster than the
default under load; shorter spins (``GOMP_SPINCOUNT`` 10,000 to 100,000) kept most of the
collapse, and one intra-op thread instead of two was slower than two passive ones, so the
thread count stays torch's default (one per core).

The policy must be in the environment before the OpenMP runtime starts, i.e. before torch is
imported: :func:`apply_policy` runs first thing in the CLI's ``main`` (subprocesses inherit
it). A user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = ["WAIT_POLICY", "MachineLoad", "apply_policy", "machine_load", "policy"]

WAIT_ENV = "OMP_WAIT_POLICY"
WAIT_POLICY = "PASSIVE"
#: Variables that already say how OpenMP threads wait: a user setting any of them is obeyed.
_USER_KNOBS = (WAIT_ENV, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply_policy(environ: MutableMapping[str, str] | None = None) -> dict[str, str | bool]:
    """Put the wait policy into ``environ`` (default ``os.environ``) unless the user chose one.

    Returns what is in force, for the record: the variable's value, who chose it ("ctxext" or
    "user"), and whether it can still take effect in this process (torch not imported yet).
    """
    env = os.environ if environ is None else environ
    user = any(k in env for k in _USER_KNOBS)
    if not user:
        env[WAIT_ENV] = WAIT_POLICY
    return {
        WAIT_ENV: env.get(WAIT_ENV, "unset"),
        "chosen_by": "user" if user else "ctxext",
        "effective": "torch" not in sys.modules,
    }


def policy() -> dict[str, str]:
    """The OpenMP settings of this process's environment (for provenance)."""
    return {k: os.environ[k] for k in (*_USER_KNOBS, "OMP_NUM_THREADS") if k in os.environ}


@dataclass(frozen=True)
class MachineLoad:
    """The machine now: the 1-minute load average (runnable threads, ours excluded when we are
    idle, as when `plan` runs) against the cores, for a run of ``threads`` threads."""

    average: float
    cores: int
    threads: int

    @property
    def slowdown(self) -> float:
        """The fair share: the time a ``threads``-thread run takes beside ``average`` other
        runnable threads, relative to an idle machine (each thread gets an equal share)."""
        return max(1.0, (self.average + self.threads) / self.cores)

    @property
    def busy(self) -> bool:
        """Worth a mention: the fair share is at least 1.5x."""
        return self.slowdown >= 1.5


def machine_load(threads: int | None = None) -> MachineLoad | None:
    """The load now (None where the OS does not report it). ``threads``: the run's (default:
    one per core, torch's default)."""
    try:
        average = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return MachineLoad(average, cores, threads or cores)
