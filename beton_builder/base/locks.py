"""Exclusive locks on an output (a run directory, a build's output) held for the life of the process."""
from __future__ import annotations

import fcntl
import os
from contextlib import suppress
from pathlib import Path

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import output_error

LOCK_NAME = ".ccfs-fast.lock"

RUN_HOLDER = "{place} is in use by another ccfs-fast run (pid {pid}); wait for it to finish or use another --output-dir"

BUILD_HOLDER = ("{place} is being written by another ccfs-fast build (pid {pid}); wait for it to finish or choose "
                "another --out")


def probe_lock(folder: Path, lock: Path | None = None, holder: str = RUN_HOLDER) -> None:
    """Fails at once (before any heavy work) when another process holds the lock (`lock`, default the
    run lock of `folder`); the real lock is taken by RunLock. Does nothing when there is no lock file."""
    path = lock or folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise ConfigError(holder.format(place=folder, pid=pid)) from None
    finally:
        os.close(fd)


class RunLock:
    """An exclusive lock on a run directory (or, with `lock` and `holder`, on any output) for the life
    of the process (flock, so the kernel releases it when the process dies, even by SIGKILL). The
    holder's PID is written into the lock file, so a second process can name it."""

    def __init__(self, folder: Path, lock: Path | None = None, holder: str = RUN_HOLDER, remove: bool = False):
        """`remove`: the lock file is removed when the lock is released (a build's, beside its output:
        nothing of a build stays behind; a run's lock file stays in its directory)."""
        self.folder, self.path, self.holder, self.remove = folder, lock or folder / LOCK_NAME, holder, remove
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise output_error(self.folder, exc) from exc  # the place the user named, not the lock file
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(self.fd)
                self.fd = None
                raise ConfigError(self.holder.format(place=self.folder, pid=pid)) from None
            try:  # a holder that removes its lock file may have done so since we opened it: lock the new one
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            if self.remove:  # while still held: no other process can hold this file's lock now
                with suppress(OSError):
                    self.path.unlink()
            os.close(self.fd)  # releases the flock
            self.fd = None


def build_lock(out: Path, single_file: bool) -> Path:
    """The lock file of a build's output: beside a single .beton (`.distilled.beton.lock`), inside a
    folder of splits (`.ccfs-fast-build.lock`)."""
    return out.parent / f".{out.name}.lock" if single_file else out / ".ccfs-fast-build.lock"
