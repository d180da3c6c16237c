"""Atomic output files (temp file + rename), their temp names, and one-line errors for writes that fail."""
from __future__ import annotations

import errno
import json
import os
import re
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from beton_builder.base.errors import OutputError

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
