"""Difficulty scores: one registry of score kinds (each declares its easy end once), file loading
and validation against the pool, and the conversion to an easy-first key (lower = easier)."""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beton_builder.base.errors import ScoreError, UnknownNameError
from beton_builder.base.safe_pickle import ArrayUnpickler

# The published score files (the paper's, Apache-2.0) shipped in the repository's scores/ folder: a
# preset of their dataset uses them when --score-path is not given, and their kinds are known by digest.
SCORES_DIR = Path(__file__).resolve().parents[2] / "scores"


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
    "memorization": ScoreKind("memorization", "low", True, "memorization estimate (Feldman & Zhang 2020)"),
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


@dataclass(frozen=True)
class NpzLayout:
    """An .npz layout: its scores, labels and file-names keys, and the score kind it names (None: any)."""

    scores: str
    labels: str
    names: str
    kind: str | None


# Layouts that name their kind: the memorization estimates (Feldman & Zhang 2020: `tr_mem`), an .npz
# under a kind's own name, and (score_file_kind) the c-scores keyed by file name (Jiang et al. 2021:
# `scores` with `filenames`) and the published files shipped in scores/. Plain `scores` (optionally
# `labels`) is any kind, as is a bare .npy (the paper's forgetting files).
NPZ_LAYOUTS = (NpzLayout("scores", "labels", "filenames", None),
               NpzLayout("tr_mem", "tr_labels", "tr_filenames", "memorization"),
               *(NpzLayout(k, "labels", "filenames", k) for k in ("forgetting", "memorization", "cscore")))
SHIPPED_KINDS = {"cscores_": "cscore", "forgetting_": "forgetting"}  # scores/ file name prefix -> kind


@dataclass(frozen=True)
class ScoreFile:
    """A score file as stored: scores [m]; labels [m] or None; names [m] (train file base names) or
    None, when the file is in pool order; `kind` the score kind its layout names (None: any)."""

    scores: np.ndarray
    labels: np.ndarray | None
    names: np.ndarray | None
    kind: str | None = None


# What an object array in a score file may be rebuilt from: numpy arrays of names (bytes or str) and
# nothing else (the published ImageNet files store their file names as object arrays of bytes).
def object_array(npz_path: Path, key: str) -> np.ndarray:
    """An object array member of an .npz, read through beton_builder's ArrayUnpickler: names as bytes ("S") or str
    ("U"), numbers as float64. ScoreError for anything else."""
    with zipfile.ZipFile(npz_path) as archive, archive.open(f"{key}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
        if not dtype.hasobject:
            raise ScoreError(f"score file {npz_path}: {key!r} is not an object array")
        try:
            array = ArrayUnpickler(fh).load()
        except pickle.UnpicklingError as exc:
            raise ScoreError(f"score file {npz_path}: {key!r} holds a pickled object other than an array of names "
                             f"({exc}); it is not loaded (a pickle can run code); save the names as a bytes or str "
                             "array") from exc
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise ScoreError(f"score file {npz_path}: {key!r} does not hold the array its header describes")
    values = array.ravel().tolist()
    for kind, as_type in ((bytes, bytes), (str, str), ((int, float, np.number), np.float64)):
        if all(isinstance(v, kind) for v in values):
            return array.astype(as_type)
    found = sorted({type(v).__name__ for v in values})
    raise ScoreError(f"score file {npz_path}: {key!r} holds {', '.join(found)} values; expected file names (bytes or "
                     "str) or numbers")


def _member(npz, path: Path, key: str) -> np.ndarray:
    """An .npz member; an object array (of names) through the restricted reader."""
    try:
        return npz[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        return object_array(path, key)


def read_score_file(path: Path) -> ScoreFile:
    """The file's arrays as stored, unchecked; load_scores validates them against a pool."""
    if not path.is_file():
        raise ScoreError(f"score file {path} does not exist; pass --score-path to a .npy or .npz file")
    try:
        if path.suffix == ".npy":
            return ScoreFile(np.load(path, allow_pickle=False), None, None)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                for layout in NPZ_LAYOUTS:
                    if layout.scores in npz:
                        return ScoreFile(*(_member(npz, path, k) if k in npz else None
                                           for k in (layout.scores, layout.labels, layout.names)), layout.kind)
                raise ScoreError(f"score file {path} has keys {sorted(npz.files)}; expected 'scores' (optionally "
                                 "'labels', 'filenames') or the memorization layout 'tr_mem', 'tr_labels', "
                                 "'tr_filenames'")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ScoreError(f"score file {path} is truncated or corrupt ({exc})") from exc
    raise ScoreError(f"score file {path}: unsupported extension {path.suffix!r}; use .npy or .npz")


def score_file_kind(path: Path) -> str | None:
    """The score kind a file names, None when it may be any kind: from its .npz keys (NPZ_LAYOUTS;
    `scores` with `filenames` is the published c-score layout) or, for the published files shipped in
    scores/, from their recorded digests (SHA256SUMS)."""
    path = Path(path)
    if not path.is_file():
        return None
    if path.suffix == ".npz":
        try:
            with zipfile.ZipFile(path) as archive:
                keys = {n.removesuffix(".npy") for n in archive.namelist()}
        except (OSError, zipfile.BadZipFile):
            return None  # read_score_file says what is wrong with it
        named = next((layout.kind for layout in NPZ_LAYOUTS if layout.scores in keys and layout.kind), None)
        if named or {"scores", "filenames"} <= keys:
            return named or "cscore"
    return shipped_kind(path)


def shipped_kind(path: Path) -> str | None:
    """The kind of a published score file shipped in scores/ (recognised by its content digest)."""
    from beton_builder.base.digests import file_sha256

    sums = SCORES_DIR / "SHA256SUMS"
    try:
        recorded = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return None
    sizes = {(SCORES_DIR / name).stat().st_size for name in recorded if (SCORES_DIR / name).is_file()}
    if path.stat().st_size not in sizes:
        return None  # not one of them: no need to hash it
    digest = file_sha256(path)
    name = next((n for n, d in recorded.items() if d == digest), "")
    return next((kind for prefix, kind in SHIPPED_KINDS.items() if name.startswith(prefix)), None)


def check_score_kind(kind: str, path: Path | None) -> None:
    """A score file whose layout names another kind than --score is refused: the kinds' easy ends may
    differ (memorization: low = easy; c-score: high = easy), so the selection would be reversed."""
    held = score_file_kind(Path(path)) if path is not None else None
    if held is not None and held != kind:
        raise ScoreError(f"score file {path} holds {SCORE_KINDS[held].description} ({held}: "
                         f"{SCORE_KINDS[held].easy_end} = easy), but --score is {kind} "
                         f"({SCORE_KINDS[kind].easy_end} = easy); pass --score {held}, or a score file of {kind}")


def base_names(names: np.ndarray) -> np.ndarray:
    """bytes [m]: the UTF-8 file base names of `names` (bytes or str [m], with or without folders).
    Vectorised, with no Python string per name: ImageNet's 1.28 M names take about 0.5 s and 0.2 GB
    (a str per name took 0.9 GB)."""
    names = np.asarray(names)
    if names.size == 0:  # numpy's rpartition fails on empty arrays
        return np.zeros(0, "S1")
    # a copy: the column alone, not a view that keeps all three parts of every name
    return np.char.rpartition(names if names.dtype.kind == "S" else utf8(names), b"/")[..., 2].copy()


def utf8(names: np.ndarray) -> np.ndarray:
    """str [m] -> their UTF-8 bytes [m]; ASCII names (ImageNet's) by narrowing the code points."""
    names = names.astype(str, copy=False)
    width = names.dtype.itemsize // 4
    if width == 0:
        return names.astype(bytes)
    points = names.view(np.uint32).reshape(len(names), width)
    if points.max(initial=0) < 128:
        return np.ascontiguousarray(points.astype(np.uint8)).view(f"S{width}").reshape(len(names))
    return np.char.encode(names, "utf-8")


def _shown(name: bytes) -> str:
    return name.decode("utf-8", errors="replace")


def align_by_name(stored: ScoreFile, pool_names: np.ndarray | None, path: Path, notes: list[str]) -> ScoreFile:
    """The file's scores and labels in pool order, matched by file base name to `pool_names` (the
    pool's recorded file names). Every pool image needs a score; scores of other files are dropped
    with a note."""
    if pool_names is None:
        raise ScoreError(f"score file {path} is keyed by file name, but the pool records no file names; build the "
                         "pool with `ccfs-fast build imagenet` (it records them), or pass scores in pool order")
    file_names, pool_base = base_names(stored.names), base_names(pool_names)
    if stored.names.shape != stored.scores.shape:
        raise ScoreError(f"score file {path}: {len(stored.names)} file names for {len(stored.scores)} scores")
    order = np.argsort(file_names, kind="stable")
    sorted_names = file_names[order]
    if len(sorted_names) > 1 and np.any(sorted_names[1:] == sorted_names[:-1]):
        twice = sorted_names[1:][sorted_names[1:] == sorted_names[:-1]][0]
        raise ScoreError(f"score file {path} names {_shown(twice)!r} more than once; one score per file")
    unique, counts = np.unique(pool_base, return_counts=True)
    if len(unique) < len(pool_base):
        example = _shown(unique[counts > 1][0])
        raise ScoreError(f"score file {path} is keyed by file name, but the pool holds {len(pool_base) - len(unique)} "
                         f"repeated base names (e.g. {example!r}), which cannot be told apart; pass scores in pool "
                         "order")
    at = np.minimum(np.searchsorted(sorted_names, pool_base), len(sorted_names) - 1)
    found = sorted_names[at] == pool_base
    if not found.all():
        missing = np.flatnonzero(~found)
        raise ScoreError(f"score file {path} has no score for {len(missing)} of the pool's {len(pool_base)} images "
                         f"(first: {pool_names[missing[0]]}, pool index {missing[0]}); use the score file of this "
                         "dataset's training split")
    rows = order[at]
    if len(file_names) > len(pool_base):
        notes.append(f"note: score file {path} scores {len(file_names)} files; the {len(pool_base)} pool images were "
                     f"matched by file name, {len(file_names) - len(pool_base)} other scores are not used")
    labels = None if stored.labels is None else np.asarray(stored.labels)[rows]
    return ScoreFile(np.asarray(stored.scores)[rows], labels, None)


def load_scores(path: str | Path, pool_labels: np.ndarray, notes: list[str] | None = None,
                pool_names: Callable[[], np.ndarray | None] | None = None) -> np.ndarray:
    """Reads a score file for a pool with labels int [n]: float64 [n] in canonical pool order. A file
    with file names is aligned to the pool by name (`pool_names()`: the pool's recorded names).

    Refuses a length other than n, NaNs, and (.npz) `labels` that differ from the pool's. What is
    accepted but worth knowing (integer or float16 values, infinite values) is appended to `notes`
    as one line each, saying what was done."""
    path = Path(path)
    said = [] if notes is None else notes
    stored = read_score_file(path)
    if stored.names is not None:
        stored = align_by_name(stored, pool_names() if pool_names is not None else None, path, said)
    scores, labels = stored.scores, stored.labels
    n = len(pool_labels)
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        raise ScoreError(f"score file {path} holds {scores.dtype} {list(scores.shape)}; expected a "
                         f"1-D float array of {n} values")
    if len(scores) != n:
        raise ScoreError(f"score file {path} has {len(scores)} values but the pool has {n} images; "
                         "use the score file of this dataset's training split")
    stored = scores.dtype
    scores = scores.astype(np.float64)
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
    tie = tie_note(scores, path)
    if tie:
        said.append(tie)
    return scores


TIE_SHARE = 0.5  # more scores than this share one value: the fine stage mostly picks by pool index


def tie_note(scores: np.ndarray, path: str | Path) -> str | None:
    """A warning when most scores (> TIE_SHARE) share one value: among tied candidates the fine stage
    picks by ascending pool index, so the selection then says little about difficulty."""
    if not len(scores):
        return None
    values, counts = np.unique(scores, return_counts=True)
    top = int(counts.argmax())
    share = counts[top] / len(scores)
    if share <= TIE_SHARE:
        return None
    return (f"warning: score file {path}: {share:.0%} of the scores ({counts[top]:,} of {len(scores):,}) are "
            f"{values[top]:g}; among tied candidates the fine stage picks by pool index, not by difficulty "
            "(forgetting scores from a teacher trained for more epochs spread further)")


def pool_order_scores(path: Path, pool: Path) -> np.ndarray:
    """A run's score file as stored, in pool order (aligned by the pool's recorded file names when
    the file is keyed by name), unvalidated: for reports of a run that validated it."""
    from beton_builder.manifest import recorded_names

    stored = read_score_file(path)
    if stored.names is not None:
        stored = align_by_name(stored, recorded_names(pool), path, [])
    return stored.scores

