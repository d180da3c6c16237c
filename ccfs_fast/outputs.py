"""Atomic output files (temp file + rename) and the run directory's bookkeeping."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .errors import ConfigError, OutputError
from .processes import available_cpus

RUN_FILES = ("selected_indices.json", "metrics.json", "exp_log.txt", "state.json", "teacher_pass.npz",
             "metrics.csv", "report.png", "selection.png", "curves.csv", "eval.json")
RUN_FOLDERS = ("tb",)  # TensorBoard event files (--tensorboard)
LOCK_NAME = ".ccfs-fast.lock"
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def temp_path(path: Path, suffix: str = "") -> Path:
    """The temp name every atomic write of this process uses for `path`: `.NAME.tmp-PID[suffix]`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def output_error(path: Path, exc: OSError | OutputError) -> OutputError:
    """A one-line, actionable error for a failed write (disk full, read-only, missing folder), naming
    `path`: the place the user named (an OutputError about a temporary path inside it is named anew)."""
    code = exc.errno
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space, then run the same command again",
            errno.EDQUOT: "free some space, then run the same command again",
            errno.EROFS: "the file system is read-only; choose a writable place",
            errno.EACCES: "no permission to write there; choose a writable place",
            errno.ENOENT: "its folder does not exist; create it or choose another place"}.get(code, "check the place")
    error = OutputError(f"cannot write {path}: {reason}; {hint}")
    error.errno, error.reason = code, reason
    return error


@contextmanager
def atomic_file(path: Path, suffix: str = ""):
    """Yields a temp path beside `path`; renames it over `path` when the block succeeds, removes it
    otherwise. OSError (disk full, read-only) becomes a one-line OutputError."""
    tmp = temp_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(path, exc) from exc
    finally:
        with suppress(OSError):
            tmp.unlink()


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable))


def write_text(path: Path, text: str) -> None:
    """Writes `text` to a temp file beside `path`, then renames it over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path, ".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Removes this tool's temp files (`.NAME.tmp-PID...`) in `folder` left by processes that are
    gone (killed mid-write); returns them."""
    removed = []
    with suppress(OSError):
        for path in folder.iterdir():
            match = TEMP_NAME.match(path.name)
            if match and int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"])) and path.is_file():
                with suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


def missing_top(path: Path) -> Path | None:
    """The highest folder of `path` (itself included) that does not exist yet: what creating `path`
    with its parents would create; None when `path` exists."""
    path = Path(path).absolute()
    top = None
    while not path.exists():
        top, path = path, path.parent
    return top


def ensure_writable(path: Path, what: str) -> None:
    """Creates `path`'s parent folders and checks a file can be written there, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path, ".probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot write there ({exc.strerror or exc}); choose a writable place") \
            from exc


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


def _jsonable(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_files(output_dir: Path) -> list[Path]:
    """The files a run writes that exist in `output_dir`."""
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    return found + sorted(output_dir.glob("phase*_candidates.npz"))


def own_files(output_dir: Path) -> list[Path]:
    """Every file and folder a run writes that exists in `output_dir`."""
    return run_files(output_dir) + [output_dir / n for n in RUN_FOLDERS if (output_dir / n).is_dir()]


def leftovers(output_dir: Path, ran_here: bool) -> list[Path]:
    """The files in `output_dir` of a ccfs-fast run that never finished a curriculum (`ran_here`: a run
    held its lock there; no state.json): what a run that failed early (a full disk, an interrupt)
    left, nothing to resume from. Files of the same names that no run of ours wrote are never these."""
    if not ran_here or (output_dir / "state.json").exists():
        return []
    return own_files(output_dir)


def output_dir_problem(output_dir: Path, resume: bool, overwrite: bool, ran_here: bool | None = None) -> str | None:
    """Why a run cannot use `output_dir` as asked (None when it can): a folder holding another run or
    other files needs --resume or --overwrite. Cheap (a directory listing): checked before any import.
    `ran_here` (default: its run lock file exists) tells whether a ccfs-fast run used the folder."""
    if resume or overwrite or not output_dir.is_dir():
        return None
    ran_here = (output_dir / LOCK_NAME).exists() if ran_here is None else ran_here
    existing = sorted(p for p in output_dir.iterdir() if p.name != LOCK_NAME and not TEMP_NAME.match(p.name))
    early = set(leftovers(output_dir, ran_here))
    foreign = [p for p in existing if p not in early]
    if not foreign:
        return None
    names = ", ".join(p.name for p in foreign[:3])
    if (output_dir / "state.json").exists():
        return (f"output directory {output_dir} holds a run ({names}...); pass --resume to continue it or --overwrite "
                "to start over")
    return f"output directory {output_dir} is not empty ({names}...); choose another --output-dir or pass --overwrite"


def prepare_output_dir(output_dir: Path, resume: bool, overwrite: bool, ran_here: bool = True) -> bool:
    """Checks a (locked) run directory: a folder holding a run or other files is refused unless
    resume (keeps it) or overwrite (removes the run's own files, nothing else); temp files of dead
    runs, and the files of a run that never finished a curriculum, are removed (with a note). Returns
    whether there is a run to resume (--resume with nothing to resume starts the run, saying so)."""
    remove_stale_temps(output_dir)
    problem = output_dir_problem(output_dir, resume, overwrite, ran_here)
    if problem:
        raise ConfigError(problem)
    if resume and (output_dir / "state.json").is_file():
        return True
    if resume:
        print(f"note: --resume: {output_dir} holds no finished curriculum (no state.json); starting the run",
              file=sys.stderr)
    found = own_files(output_dir) if overwrite else leftovers(output_dir, ran_here)
    if found and not overwrite:
        print(f"note: removed {', '.join(p.name for p in found)}: the files of a run in {output_dir} that never "
              "finished a curriculum", file=sys.stderr)
    for path in found:
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise output_error(path, exc) from exc
    return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: str | None = None) -> dict:
    """Machine, device and library versions recorded beside every result (device default: cuda
    when available, else cpu)."""
    import time
    from importlib.metadata import version

    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": version("torchvision"),
            "ffcv": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
            "numba": version("numba"), "numpy": np.__version__, "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "available_cpus": available_cpus(), "load_average": _load(),
            "torch_threads": torch.get_num_threads(), "device": device,
            "cuda": torch.cuda.get_device_name(0) if cuda else None, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
