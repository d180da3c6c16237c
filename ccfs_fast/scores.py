"""Difficulty scores: one registry of score kinds (each declares its easy end once), file loading
and validation against the pool, and the conversion to an easy-first key (lower = easier)."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ScoreError, UnknownNameError


@dataclass(frozen=True)
class ScoreKind:
    """A difficulty score. easy_end: 'low' or 'high' values are easy; from_file: read from
    --score-path (else computed during the run, e.g. the filter's true-class logit)."""

    name: str
    easy_end: str
    from_file: bool
    description: str


SCORE_KINDS: dict[str, ScoreKind] = {
    "forgetting": ScoreKind("forgetting", "low", True, "forgetting events (Toneva et al. 2019)"),
    "cscore": ScoreKind("cscore", "high", True, "consistency score (Jiang et al. 2021)"),
    "logits": ScoreKind("logits", "high", False, "the phase filter's logit of the true class"),
}


def score_kind(name: str) -> ScoreKind:
    if name not in SCORE_KINDS:
        raise UnknownNameError("score kind", name, list(SCORE_KINDS))
    return SCORE_KINDS[name]


def easy_first_key(scores: np.ndarray, kind: str) -> np.ndarray:
    """float64 [n] where lower = easier, from raw scores of `kind`."""
    values = np.asarray(scores, dtype=np.float64)
    return values if score_kind(kind).easy_end == "low" else -values


def read_score_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores, labels or None) as stored, unchecked; load_scores validates them against a pool."""
    if not path.is_file():
        raise ScoreError(f"score file {path} does not exist; pass --score-path to a .npy or .npz file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                if "scores" not in npz:
                    raise ScoreError(f"score file {path} has keys {sorted(npz.files)}; expected 'scores' "
                                     "(and optionally 'labels')")
                return npz["scores"], (npz["labels"] if "labels" in npz else None)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ScoreError(f"score file {path} is truncated or corrupt ({exc})") from exc
    raise ScoreError(f"score file {path}: unsupported extension {path.suffix!r}; use .npy or .npz")


def load_scores(path: str | Path, pool_labels: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Reads a score file for a pool with labels int [n]: float64 [n] in canonical pool order.

    Refuses a length other than n, NaNs, and (.npz) `labels` that differ from the pool's. What is
    accepted but worth knowing (integer or float16 values, infinite values) is appended to `notes`
    as one line each, saying what was done."""
    path = Path(path)
    scores, labels = read_score_file(path)
    n = len(pool_labels)
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        raise ScoreError(f"score file {path} holds {scores.dtype} {list(scores.shape)}; expected a "
                         f"1-D float array of {n} values")
    if len(scores) != n:
        raise ScoreError(f"score file {path} has {len(scores)} values but the pool has {n} images; "
                         "use the score file of this dataset's training split")
    stored = scores.dtype
    scores = scores.astype(np.float64)
    said = [] if notes is None else notes
    if np.issubdtype(stored, np.integer) or np.issubdtype(stored, np.bool_):
        said.append(f"note: score file {path} holds {stored} values; read exactly as float64 (equal values tie, "
                    "ties broken by pool index)")
    elif stored == np.float16:
        said.append(f"note: score file {path} holds float16 values (about 3 significant digits); converted to "
                    "float64 as stored (values that float16 rounded together tie, ties broken by pool index)")
    nans = np.flatnonzero(np.isnan(scores))
    if len(nans):
        raise ScoreError(f"score file {path} has {len(nans)} NaN values (first at index {nans[0]}); "
                         "recompute the scores")
    pos, neg = int(np.isposinf(scores).sum()), int(np.isneginf(scores).sum())
    if pos or neg:
        said.append(f"note: score file {path} has {pos} +inf and {neg} -inf values (first at index "
                    f"{np.flatnonzero(np.isinf(scores))[0]}); kept: they rank beyond every finite score, ties among "
                    "them broken by pool index")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ScoreError(f"score file {path}: 'labels' has shape {list(labels.shape)}, the pool {n} images")
        differ = np.flatnonzero(labels != np.asarray(pool_labels))
        if len(differ):
            i = differ[0]
            raise ScoreError(f"score file {path}: labels differ from the pool's at {len(differ)} indices, first "
                             f"at index {i} (file {labels[i]}, pool {pool_labels[i]}); the file is for another "
                             "dataset or another image order")
    return scores
