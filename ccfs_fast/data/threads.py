"""Thread counts sized to the CPUs really available, and to what other jobs leave free."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from beton_builder.base.processes import available_cpus

if TYPE_CHECKING:  # torch is imported where threads are set: the CLI's argument checks stay light
    import torch


def configure_threads(threads: int | None = None) -> int:
    """Sets torch's and numba's thread counts for the whole process (default: the CPUs this process
    may use, shared by torchrun's ranks on a node) and returns the count. Importing FFCV sets both to
    1 (ffcv/pipeline/compiler.py), so FFCV is imported first. The CLI calls this once; a notebook
    calls it through `ccfs_fast.run` or itself."""
    import numba
    import torch

    import beton_builder.ffcv_import  # noqa: F401

    count = threads or max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(count)
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    return count


# OpenMP's wait at the end of each parallel region, set before torch loads its libgomp (which reads it
# once, at load). libgomp's default spins up to 300,000 times before sleeping: on cores shared with
# other jobs a spinning thread competes with the thread it waits for, and a convnet_tiny filter's
# training swung from 1 s to 39 s beside two busy jobs on 2 cores (bench phase --under-load); at
# 10,000 spins it took 2.3-4.1 s there and 0.86-0.94 s idle (default: 0.75-0.98 s). Sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) held under load too but cost 30-80% idle.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "10000"}


OPENMP_SET_BY_US = "CCFS_FAST_OPENMP_DEFAULTS"  # names the variables openmp_defaults set (not the user)


def openmp_defaults(env: dict | None = None) -> dict[str, str]:
    """Sets OPENMP_DEFAULTS in `env` (default: this process's environment) where the user set neither
    that variable nor OMP_WAIT_POLICY, and names them in OPENMP_SET_BY_US; returns what it set. Acts
    only before torch is imported (the console script calls it first; a notebook sets the variable
    itself before `import torch`)."""
    env = os.environ if env is None else env
    if "OMP_WAIT_POLICY" in env:
        return {}
    added = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in env}
    env.update(added)
    if added:
        env[OPENMP_SET_BY_US] = ",".join(sorted(added))  # a later call finds them set and adds nothing
    return added


def child_env(env: dict, ccfs_fast: bool) -> dict:
    """The environment of a benchmark's child process: with ccfs-fast's OpenMP defaults (as its console
    script gives itself), or without what they set (the paper's code, as a user's shell starts it)."""
    env = dict(env)
    if ccfs_fast:
        openmp_defaults(env)
        return env
    return without_openmp_defaults(env)


def without_openmp_defaults(env: dict) -> dict:
    """`env` less what openmp_defaults set there (a child process that must run as if ccfs-fast had
    not started it: the benchmarks' baseline, the paper's code)."""
    ours = set(env.get(OPENMP_SET_BY_US, "").split(",")) - {""}
    return {k: v for k, v in env.items() if k not in ours and k != OPENMP_SET_BY_US}


def _busy_ticks() -> tuple[int, int] | None:
    """(ticks all CPUs spent busy, ticks this process spent), from /proc; None where unreadable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(v) for v in fields]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])  # minus idle, iowait; utime + stime
    except (OSError, ValueError, IndexError):
        return None


class CpuShare:
    """How many threads this process's elementwise work should use now. Other jobs on the machine
    are measured (CPU time all processes spent minus this process's, over the last `interval_s`):
    when they keep C of the N available CPUs busy, N - C threads (at least 1). An OpenMP parallel
    region waits for its slowest thread, and on busy cores a thread is descheduled for whole time
    slices, so two threads on 2 contended cores ran a batch-32 augmentation 2-3x slower than one
    (measured: 5-7 k img/s against 13 k). Used only where the result does not depend on the thread
    count (per-element ops: crop, resize, flip, normalise), so a run's numbers never depend on load."""

    def __init__(self, interval_s: float = 0.5):
        import time

        self.interval_s, self._clock = interval_s, time.monotonic
        self._last = (self._clock(), _busy_ticks())
        self._threads: int | None = None

    def threads(self, most: int) -> int:
        """The thread count for the next elementwise work, at most `most` (the process's setting)."""
        now = self._clock()
        then, before = self._last
        if self._threads is None or now - then >= self.interval_s:
            after = _busy_ticks()
            if before is not None and after is not None and now > then:
                hz = os.sysconf("SC_CLK_TCK")
                others = max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / hz / (now - then)
                self._threads = max(1, available_cpus() - int(others + 0.5))
            self._last = (now, after)
        return max(1, min(most, self._threads or most))


@contextmanager
def elementwise_threads(share: CpuShare, device: torch.device) -> Iterator[None]:
    """On the CPU, per-element work (augmentation, normalisation: results independent of the thread
    count) runs on the threads `share` grants now; on other devices nothing changes."""
    if device.type != "cpu":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    wanted = share.threads(threads)
    if wanted == threads:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _keep_torch_threads() -> Iterator[None]:
    # FFCV's Loader calls torch.set_num_threads(num_workers) globally; keep the caller's setting.
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def process_settings(threads: int | None) -> None:
    """Process-wide settings of a command, once: SIGTERM handled as Ctrl-C is, forked workers that die
    with this process, freed memory reused by the allocator, and the thread counts (configure_threads)."""
    from beton_builder.base.processes import children_die_with_parent, handle_sigterm, reuse_freed_memory

    handle_sigterm()
    children_die_with_parent()
    reuse_freed_memory()
    configure_threads(threads)
