"""Typed errors. Every error a user can cause derives from CCFSError and says what was received,
what was expected and how to fix it; the CLI prints its message on one line and exits non-zero."""
from __future__ import annotations

import difflib


class CCFSError(Exception):
    """Base class of every user-facing error in ccfs-fast and beton_builder."""


class BuildError(CCFSError):
    """A dataset could not be converted to .beton (bad layout, corrupt file, wrong shapes)."""


class DataError(CCFSError):
    """A .beton file or its manifest is missing, stale or inconsistent with another input."""


class ConfigError(CCFSError):
    """A command's settings are invalid or contradict each other."""


class ScoreError(CCFSError):
    """A difficulty score file does not fit the pool (length, NaNs, labels)."""


class SelectionError(CCFSError):
    """Selection could not meet its budget under the `strict` shortfall policy."""


class ModelError(CCFSError):
    """A model name or checkpoint does not fit (unknown architecture, class-count mismatch)."""


class OutputError(CCFSError):
    """An output could not be written (disk full, read-only or missing place); `errno` and `reason`: the
    system's error, when it came from one."""

    errno: int | None = None
    reason: str | None = None


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message lists the valid names."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{guess}; valid {plural(kind)}: {', '.join(sorted(valid))}")
        self.kind, self.name, self.valid = kind, name, valid


def plural(noun: str) -> str:
    """'policy' -> 'policies', 'kind' -> 'kinds' (the last word of a phrase)."""
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")


def one_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line (whitespace runs folded), at most `limit` characters; its
    type's name when it has no message."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


class RegressionError(CCFSError):
    """A benchmark measured a ratio below the committed one by more than the tolerance (exit 1, not 2:
    the command ran as asked, the engine got slower)."""

    exit_code = 1
