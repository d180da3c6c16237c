"""Process plumbing: SIGTERM handled like Ctrl-C, forked helpers that die with their parent (even
when it is killed with SIGKILL), work run in a child process group that a signal can stop whole, and
the C allocator's reuse of freed memory. Linux only (prctl, glibc's mallopt); elsewhere the helpers
fall back to doing nothing."""
from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

PR_SET_PDEATHSIG = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the reusable heap

TRIM_THRESHOLD = 1 << 30   # keep up to 1 GiB of freed heap for the next allocations


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks clean up as for KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread (instead of killing the process on the spot).
    Processes forked from then on get the default SIGTERM back (see _default_sigterm_in_child)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    _forked_children_get_default_sigterm()


def _default_sigterm_in_child() -> None:
    # A forked worker (multiprocessing.Pool's, FFCV's) must die on SIGTERM as its parent expects:
    # Pool.terminate() SIGTERMs workers that may hold the task queue's lock, and an inherited
    # Python handler would raise Terminated at an arbitrary point instead, leaving that lock held
    # and the other workers (and the pool's join) waiting forever.
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@functools.cache  # once per process: fork handlers cannot be unregistered
def _forked_children_get_default_sigterm() -> None:
    os.register_at_fork(after_in_child=_default_sigterm_in_child)


@functools.cache  # once per process
def reuse_freed_memory() -> bool:
    """Makes glibc's malloc serve tensors up to 32 MiB from memory freed earlier instead of mapping
    fresh pages for each and unmapping them on free. On a CPU every torch op allocates its output;
    with glibc's defaults (a threshold that starts at 128 KiB) a training step spends much of its time
    in page faults zeroing new pages (a KD step of convnet_tiny 64x64 at batch 64: 85-94 -> 72-77
    CPU-ms; its forward at batch 256: 1.3-1.9x). Freed memory is kept for reuse, so the resident
    size stays near the peak instead of falling back between steps. Returns whether it took effect
    (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def die_with_parent(parent: int | None = None) -> None:
    """Asks the kernel to SIGKILL this process when its parent exits (set in forked children).
    `parent`: the pid of the process that forked this one (pass os.getpid() from the parent, e.g. as a
    pool's initargs), default the one recorded at the fork (children_die_with_parent); a child whose
    parent is no longer that process (it died before the request was in place) exits at once. A parent
    with pid 1 (a container's entry point) is a live parent, not a sign of one gone."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expected = parent if parent is not None else _FORKED_BY.get("pid")
    if expected is not None and os.getppid() != expected:
        os._exit(1)


# the pid of the process about to fork, recorded in it by the at-fork hook and read in the child
_FORKED_BY: dict[str, int] = {}


@functools.cache  # once per process: fork handlers cannot be unregistered
def children_die_with_parent() -> None:
    """Every process forked from now on (multiprocessing pools, FFCV's writer workers) dies with the
    process that forked it, so no worker outlives a killed command."""
    os.register_at_fork(before=lambda: _FORKED_BY.update(pid=os.getpid()), after_in_child=die_with_parent)


def quiet_teardown() -> None:
    """What an interrupted command runs before its last line: exceptions that threads and finalizers
    raise while the interrupted work is torn down (FFCV's epoch iterators, a reader's half-made memory
    context: "AttributeError: ... 'executor'") are silenced, and the garbage is collected now, so none
    is printed after that line."""
    import gc
    import threading

    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    gc.collect()


def _isolated(fn: Callable, args: tuple, errors: multiprocessing.queues.SimpleQueue, parent: int) -> None:
    os.setpgrp()  # its own process group: the parent can kill it and everything it forked at once
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent)
    children_die_with_parent()
    try:
        fn(*args)
    except BaseException as exc:  # reported to the parent, which raises it as a one-line error
        errors.put((type(exc).__name__, getattr(exc, "errno", None), str(exc), traceback.format_exc(limit=3)))
        os._exit(1)
    errors.put(None)


def run_isolated(fn: Callable, *args: object) -> tuple[str, int | None, str] | None:
    """Runs fn(*args) in a forked child in a process group of its own and waits for it. If this
    process is interrupted (Ctrl-C, SIGTERM) the whole group is killed before the exception goes on,
    so nothing it started keeps running. Returns None on success, else the child's (exception type,
    errno, message)."""
    ctx = multiprocessing.get_context("fork")
    errors = ctx.SimpleQueue()
    proc = ctx.Process(target=_isolated, args=(fn, args, errors, os.getpid()))
    proc.start()
    try:
        while proc.is_alive():
            proc.join(0.2)
    except BaseException:
        # SIGTERM first: the child cleans up what outlives it (FFCV's /dev/shm segment), then SIGKILL
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, None)):
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            proc.join(wait)
            if not proc.is_alive():
                break
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its workers too
        raise
    outcome = errors.get() if not errors.empty() else ("ChildDied", None, f"exit code {proc.exitcode}", "")
    if outcome is not None:
        sys.stderr.write("\n")  # the child's progress bar may have stopped mid-line: the error starts on its own
        sys.stderr.flush()
    return None if outcome is None else outcome[:3]


def bounded_imap(pool, fn: Callable, jobs, ahead: int):
    """pool.imap(fn, jobs) in order, with at most `ahead` jobs submitted and not yet taken: Pool.imap
    feeds every job to its workers' queue as fast as it can, so jobs that carry data (image bytes
    read from a file) would all sit in memory at once."""
    from collections import deque

    pending: deque = deque()
    for job in jobs:
        pending.append(pool.apply_async(fn, (job,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def available_cpus() -> int:
    """The CPUs this process may really use: its affinity mask (taskset, a batch scheduler's
    cpuset) capped by a cgroup CPU quota (containers: cpu.max in cgroup v2, cfs_quota_us in v1),
    which os.cpu_count() ignores. Thread pools sized to os.cpu_count() on a machine that grants
    fewer CPUs oversubscribe them: every parallel region then waits on a descheduled thread."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by this process's cgroup quota (e.g. 1.5), or None when unlimited / unknown."""
    with suppress(OSError, ValueError):
        limit, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "150000 100000"
        return None if limit == "max" else int(limit) / int(period)
    with suppress(OSError, ValueError):
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    return None
