"""The teacher pass and its signed cross-run cache.

The teacher's argmax is kept per pool image in a memo (TeacherMemo). `full` predicts every pool image
before the first curriculum; `lazy` predicts an image the first time a phase's coarse pass reaches
it (selection.coarse: the gate), so a run predicts what its selection reads. A cache entry holds
every prediction made so far (UNKNOWN where none was), signed; a later run with the same teacher and
pool starts from it and adds what it needs."""
from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
import zipfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beton_builder.base.digests import cache_dir, fresh_digest, keyed_digest, sweep_cache
from beton_builder.base.errors import DataError, ModelError, OutputError
from beton_builder.base.files import write_npz
from ccfs_fast.runs.config import TEACHER_PASSES
from ccfs_fast.runs.workspace import Workspace
from ccfs_fast.train.distributed import broadcast
from ccfs_fast.train.models import (
    canonical_model_name,
)
from ccfs_fast.train.settings import check_choice

UNKNOWN = -2  # a pool image the teacher has not predicted (yet): a lazy pass's memo, a partial cache entry


def teacher_pass_origin(ws: Workspace, teacher_digest: str) -> dict:
    """What a teacher pass is computed from: the teacher file and architecture, the pool, the
    normalisation, the precision and the layout. Its digest names the cache entry; the entry stores it."""
    return {"teacher_sha256": teacher_digest, "teacher_arch": canonical_model_name(ws.teacher_arch),
            "pool_content_hash": ws.space.manifest.content_hash, "pool_beton_sha256": ws.space.pool.digest(),
            "pool_n": ws.space.n_pool, "side": ws.side, "normalize": [round(v, 8) for v in ws.norm.mean + ws.norm.std],
            "precision": "bf16" if ws.fast.bf16 else "fp32",
            "layout": "channels_last" if ws.fast.infer_channels_last else "nchw",  # float rounding differs
            "entry_format": 2}  # 2: partial entries (UNKNOWN); versions before it would call them damaged


def teacher_pass_path(origin: dict) -> Path:
    """The cache entry of a teacher pass, named by the digest of what it is computed from."""
    name = hashlib.sha256(json.dumps(origin, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / f"teacher_pass-{name}.npz"


def pred_checksum(pred: np.ndarray, origin: dict) -> str | None:
    """The entry's signature: keyed (digests.keyed_digest) over what it is made from and its
    predictions, so an entry edited by hand, even with a plain checksum recomputed, no longer matches.
    None when this user has no cache key."""
    return keyed_digest(json.dumps(origin, sort_keys=True).encode(), np.ascontiguousarray(pred, "<i8").tobytes())


def read_cached_pass(path: Path, origin: dict, num_classes: int) -> tuple[np.ndarray | None, str | None]:
    """(pred, None) from a sound cache entry; (None, why) when it is missing (why None) or damaged."""
    if not path.is_file():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as cached:
            pred, made_from, checksum = cached["pred"], json.loads(str(cached["made_from"])), str(cached["checksum"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return None, f"unreadable: {type(exc).__name__}"
    if made_from != origin:
        return None, "made from other inputs"
    if pred.shape != (origin["pool_n"],) or not np.issubdtype(pred.dtype, np.integer):
        return None, "its predictions have the wrong shape or type"
    expected = pred_checksum(pred, origin)
    if expected is None or not hmac.compare_digest(expected.encode(), checksum.encode("utf-8", "replace")):
        return None, "its contents do not match their signature (edited, or signed with another cache key)"
    return _checked(pred, origin, num_classes)


def _checked(pred: np.ndarray, origin: dict, num_classes: int) -> tuple[np.ndarray | None, str | None]:
    """(pred as int64, None) when it has the pool's shape and every known prediction is a class."""
    if pred.shape != (origin["pool_n"],) or not np.issubdtype(pred.dtype, np.integer):
        return None, "its predictions have the wrong shape or type"
    known = pred != UNKNOWN
    if known.any() and (pred[known].min() < 0 or pred[known].max() >= num_classes):
        return None, "predictions outside the classes"
    return pred.astype(np.int64), None


def joined(pred: np.ndarray, other: np.ndarray | None) -> np.ndarray:
    """`pred` with its UNKNOWN entries taken from `other` where it knows them (a copy)."""
    pred = pred.copy()
    if other is not None:
        fill = (pred == UNKNOWN) & (other != UNKNOWN)
        pred[fill] = other[fill]
    return pred

PROBE = 64  # pool images a lazy teacher pass predicts before the first curriculum (spread over the pool)
VERIFY_SAMPLE = 256  # pool images the teacher predicts to check a cached teacher pass (about 1.6 s on a 2-core CPU)

NEAR_TIE = 0.02  # a relative top-2 margin below this is a near-tie (TF32 / bf16 / cuDNN's algorithms may flip it)


def disagreement(ws: Workspace, pred: np.ndarray, sample: int = VERIFY_SAMPLE) -> str | None:
    """Checks a cached teacher pass against the teacher itself: the teacher predicts a fresh random
    sample of `sample` pool images (the same sample on every rank) and must agree with `pred` on every
    one whose top-2 margin is clear (relative margin >= NEAR_TIE). Near-ties are left out: predicted at
    another batch size, with TF32 or bf16 and cuDNN's per-batch choice of algorithm, a sound entry's
    near-ties flip on a GPU. Returns None when it agrees, else what disagreed. The signature says an
    entry is the one this user's ccfs-fast wrote; this says it is the teacher's."""
    seed = broadcast(int(np.random.default_rng().integers(2**62)) if ws.dist.is_main else None, ws.dist)
    known = np.flatnonzero(pred != UNKNOWN)  # a partial entry is checked on what it holds
    rows = np.sort(np.random.default_rng(seed).choice(known, min(sample, len(known)), replace=False))
    index, now, margin = ws.predict_pool(ws.teacher, rows, "margin")
    clear = margin >= NEAR_TIE
    wrong = int(((now != pred[index]) & clear).sum())
    return None if wrong == 0 else (f"it disagrees with the teacher on {wrong} of the {int(clear.sum())} sampled "
                                    f"images whose prediction is clear (of {len(rows)} sampled)")


def check_pool_unchanged(ws: Workspace) -> None:
    """The pool file hashed now (not its remembered digest) against its manifest's record: a pool changed
    in place with its modification time kept passes the cheap checks, and the teacher then disagrees
    with a sound cache entry; the pool is named as the stale file instead of the cache being blamed."""
    pool = ws.space.pool
    recorded = pool.manifest.beton_sha256
    if recorded is None:
        return
    actual = fresh_digest(pool.path)
    if actual != recorded:
        raise DataError(f"{pool.path}: its content (sha256 {actual[:12]}...) no longer matches its manifest's record "
                        f"({recorded[:12]}...): the file changed after it was built, its modification time kept; "
                        "rebuild it with `ccfs-fast build ... --overwrite`")


@dataclass
class TeacherMemo:
    """The teacher's argmax per pool image, predicted once, when first asked for. pred int64 [n]:
    UNKNOWN where not predicted yet. `made` / `seconds`: the predictions this process made and the
    seconds they took; `from_cache` / `from_run`: the predictions it started with from the cross-run
    cache and (on resume) from the run's own teacher_pass.npz."""

    ws: Workspace
    origin: dict
    pred: np.ndarray
    mode: str = "full"
    from_cache: int = 0
    from_run: int = 0
    made: int = 0
    seconds: float = 0.0
    _saved: int = field(default=0, repr=False)

    @property
    def known(self) -> int:
        """Pool images the teacher has predicted (in this run or an earlier one)."""
        return int((self.pred != UNKNOWN).sum())

    def correct_mask(self) -> np.ndarray:
        """bool [n]: predicted by the teacher and correct (an image not predicted yet is False)."""
        return self.pred == self.ws.pool_labels

    def ensure(self, indices: np.ndarray) -> None:
        """Predicts those of `indices` the teacher has not predicted yet (every rank does: under
        torchrun each predicts its shard and all receive every result)."""
        indices = np.asarray(indices, np.int64)
        missing = np.unique(indices[self.pred[indices] == UNKNOWN])
        if not len(missing):
            return
        start = time.perf_counter()
        index, pred, _ = self.ws.predict_pool(self.ws.teacher, missing)
        bad = np.flatnonzero(pred < 0)
        if len(bad):
            raise ModelError(f"the teacher gives non-finite logits on {len(bad)} of {len(pred)} pool images (first: "
                             f"index {index[bad[0]]}); check the checkpoint and the normalisation (--normalize)")
        self.pred[index] = pred
        self.made += len(index)
        self.seconds += time.perf_counter() - start

    def correct(self, indices: np.ndarray) -> np.ndarray:
        """bool [len(indices)]: whether the teacher classifies each of `indices` correctly (predicting
        the ones not predicted yet): the coarse pass's gate."""
        indices = np.asarray(indices, np.int64)
        self.ensure(indices)
        return self.pred[indices] == self.ws.pool_labels[indices]

    def save(self) -> None:
        """Writes the memo to the cross-run cache (rank 0, when it holds predictions not written yet),
        joined with what the entry on disk holds now (a run beside this one may have added to it).
        A cache that cannot be written is a warning."""
        if not self.ws.dist.is_main or self.made == self._saved:
            return
        path = teacher_pass_path(self.origin)
        pred = joined(self.pred, read_cached_pass(path, self.origin, self.ws.num_classes)[0])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            signature = pred_checksum(pred, self.origin)
            if signature is None:
                raise OSError(f"no cache key could be made in {cache_dir()}")
            write_npz(path, pred=pred, made_from=np.array(json.dumps(self.origin)), checksum=np.array(signature))
            self._saved = self.made
        except (OSError, OutputError) as exc:
            print(f"warning: the teacher-pass cache {path} cannot be written ({exc}); continuing without it",
                  file=sys.stderr)


def open_teacher_pass(ws: Workspace, teacher_digest: str, mode: str = "full",
                      run_file: Path | None = None) -> TeacherMemo:
    """The run's teacher memo: started from the cross-run cache entry named by what the pass is
    computed from (teacher_pass_origin; a damaged entry is reported in one line, deleted and ignored;
    a sound one is checked against the teacher on a sample) and, on resume, from the run's own
    teacher_pass.npz (`run_file`, when made from the same inputs). `full` then predicts every pool
    image not known yet; `lazy` leaves that to the coarse passes."""
    check_choice("teacher pass", mode, TEACHER_PASSES)
    origin = teacher_pass_origin(ws, teacher_digest)
    path = teacher_pass_path(origin)
    sweep_cache(path.parent)
    # rank 0 reads for all: a run beside this one may rewrite the entry between two ranks' reads, and
    # every rank must then ask the teacher for the same images (collective predictions)
    pred, damage = broadcast(read_cached_pass(path, origin, ws.num_classes) if ws.dist.is_main else None, ws.dist)
    if pred is not None and (pred != UNKNOWN).any():
        damage = disagreement(ws, pred)
        if damage is not None:
            check_pool_unchanged(ws)  # a signed entry the teacher disagrees with: is it the pool that changed?
            pred = None
    if damage and ws.dist.is_main:
        print(f"warning: teacher-pass cache {path} is damaged ({damage}); deleted, recomputing", file=sys.stderr)
        with suppress(OSError):
            path.unlink()
    pred = np.full(ws.space.n_pool, UNKNOWN, np.int64) if pred is None else pred
    from_cache = int((pred != UNKNOWN).sum())
    own = broadcast(read_run_pass(run_file, origin, ws.num_classes) if ws.dist.is_main else None, ws.dist)
    memo = TeacherMemo(ws, origin, joined(pred, own), mode)
    memo.from_cache = from_cache
    memo.from_run = memo.known - from_cache
    if mode == "full":
        memo.ensure(np.arange(ws.space.n_pool))
        memo.save()
    elif memo.known == 0:  # a broken checkpoint fails now, not after the first filter's training
        memo.ensure(np.unique(np.linspace(0, ws.space.n_pool - 1, min(PROBE, ws.space.n_pool)).astype(np.int64)))
    return memo


def write_run_pass(path: Path, memo: TeacherMemo) -> None:
    """teacher_pass.npz in a run directory: index, pred (UNKNOWN: not predicted by the teacher) and
    what they were made from, which --resume reads back."""
    write_npz(path, index=np.arange(len(memo.pred)), pred=memo.pred, made_from=np.array(json.dumps(memo.origin)))


def read_run_pass(path: Path | None, origin: dict, num_classes: int) -> np.ndarray | None:
    """A run's own teacher_pass.npz (its resume), when it was made from `origin` and is whole."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            pred, made_from = saved["pred"], json.loads(str(saved["made_from"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return _checked(pred, origin, num_classes)[0] if made_from == origin else None


def teacher_correct(ws: Workspace, teacher_digest: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """The full teacher pass: argmax on every pool image, unaugmented (open_teacher_pass, `full`).
    Returns (pred int64 [n], teacher_correct bool [n], whether every prediction came from the cache)."""
    memo = open_teacher_pass(ws, teacher_digest, "full")
    return memo.pred, memo.correct_mask(), memo.made == 0
