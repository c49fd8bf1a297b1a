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
On idle cores, though, PASSIVE cost 21% of a fine-tune step (threads woken for every short
parallel region), so ctxext sets it only when the cores are shared at start (other threads
running, or several processes of one launch): :func:`shared_now`.

The policy must be in the environment before the OpenMP runtime starts, i.e. before torch is
imported: :func:`apply_policy` runs first thing in the CLI's ``main`` (subprocesses inherit
it). A user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

__all__ = [
    "WAIT_POLICY",
    "MachineLoad",
    "apply_policy",
    "machine_load",
    "policy",
    "shared_now",
    "usable_cores",
]

WAIT_ENV = "OMP_WAIT_POLICY"
WAIT_POLICY = "PASSIVE"
#: Variables that already say how OpenMP threads wait: a user setting any of them is obeyed.
_USER_KNOBS = (WAIT_ENV, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def apply_policy(
    environ: MutableMapping[str, str] | None = None, busy: bool | None = None
) -> dict[str, str | bool]:
    """Put the wait policy into ``environ`` (default ``os.environ``) unless the user chose one.

    PASSIVE only where the cores are shared (``busy``; default: :func:`shared_now`): on idle
    cores libgomp's spinning is what makes short parallel regions fast (a fine-tune step of the
    bundled model took 21% longer with PASSIVE on 2 idle cores), while beside other runnable
    threads the spinning takes the time slices the working threads need (12x slower where the
    fair share is 3x; benchmarks/bench_load.py). Returns what is in force, for the record: the
    variable's value, who chose it ("ctxext" or "user"), why, and whether it can still take
    effect in this process (torch not imported yet).
    """
    env = os.environ if environ is None else environ
    user = any(k in env for k in _USER_KNOBS)
    why = "set by the user"
    if not user:
        shared = shared_now(env) if busy is None else busy
        why = "cores shared at start" if shared else "cores idle at start: libgomp's default spin"
        if shared:
            env[WAIT_ENV] = WAIT_POLICY
    return {
        WAIT_ENV: env.get(WAIT_ENV, "unset"),
        "chosen_by": "user" if user else "ctxext",
        "why": why,
        "effective": "torch" not in sys.modules,
    }


def shared_now(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether this process will share the cores with other runnable threads: it is one of
    several processes of a launch on this machine (``LOCAL_WORLD_SIZE`` > 1, as torchrun and
    `accelerate launch` export), or other threads are running now (the median of a few reads
    of /proc/loadavg's running count, this reader excluded; elsewhere the 1-minute load
    average is at least 1)."""
    env = os.environ if environ is None else environ
    if int(env.get("LOCAL_WORLD_SIZE", "1") or 1) > 1:
        return True
    running = []
    try:
        for i in range(5):
            if i:
                time.sleep(0.005)
            with open("/proc/loadavg") as f:
                running.append(int(f.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] >= 1.0
        except (OSError, AttributeError):
            return False
    return sorted(running)[len(running) // 2] >= 1


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
    cores = usable_cores()
    return MachineLoad(average, cores, threads or cores)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1
