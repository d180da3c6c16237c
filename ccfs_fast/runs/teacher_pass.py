"""The teacher pass (once per run) and its signed cross-run cache."""
from __future__ import annotations

import hashlib
import hmac
import json
import sys
import zipfile
from contextlib import suppress
from pathlib import Path

import numpy as np

from beton_builder.base.digests import cache_dir, fresh_digest, keyed_digest, sweep_cache
from beton_builder.base.errors import DataError, ModelError, OutputError
from beton_builder.base.files import write_npz
from ccfs_fast.runs.workspace import Workspace
from ccfs_fast.train.distributed import broadcast
from ccfs_fast.train.models import (
    canonical_model_name,
)


def teacher_pass_origin(ws: Workspace, teacher_digest: str) -> dict:
    """What a teacher pass is computed from: the teacher file and architecture, the pool, the
    normalisation, the precision and the layout. Its digest names the cache entry; the entry stores it."""
    return {"teacher_sha256": teacher_digest, "teacher_arch": canonical_model_name(ws.teacher_arch),
            "pool_content_hash": ws.space.manifest.content_hash, "pool_beton_sha256": ws.space.pool.digest(),
            "pool_n": ws.space.n_pool, "side": ws.side, "normalize": [round(v, 8) for v in ws.norm.mean + ws.norm.std],
            "precision": "bf16" if ws.fast.bf16 else "fp32",
            "layout": "channels_last" if ws.fast.infer_channels_last else "nchw"}  # float rounding differs


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
    if len(pred) and (pred.min() < 0 or pred.max() >= num_classes):
        return None, "predictions outside the classes"
    return pred.astype(np.int64), None

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
    rows = np.sort(np.random.default_rng(seed).choice(len(pred), min(sample, len(pred)), replace=False))
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


def teacher_correct(ws: Workspace, teacher_digest: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """The teacher pass (once): argmax on every pool image, unaugmented. Cached on disk under the
    digest of what it is computed from (teacher_pass_origin); a damaged entry is reported in one line,
    deleted and recomputed, and a cache that cannot be written is a warning. A teacher with
    non-finite logits is refused. Returns (pred int64 [n], teacher_correct bool [n], came_from_cache)."""
    origin = teacher_pass_origin(ws, teacher_digest)
    path = teacher_pass_path(origin)
    sweep_cache(path.parent)
    pred, damage = read_cached_pass(path, origin, ws.num_classes)
    if pred is not None:
        damage = disagreement(ws, pred)
        if damage is None:
            return pred, pred == ws.pool_labels, True
        check_pool_unchanged(ws)  # a signed entry the teacher disagrees with: is it the pool that changed?
    if damage and ws.dist.is_main:
        print(f"warning: teacher-pass cache {path} is damaged ({damage}); deleted, recomputing", file=sys.stderr)
        with suppress(OSError):
            path.unlink()
    index, pred, _ = ws.predict_pool(ws.teacher, np.arange(ws.space.n_pool))
    pred = pred[np.argsort(index)]
    bad = np.flatnonzero(pred < 0)
    if len(bad):
        raise ModelError(f"the teacher gives non-finite logits on {len(bad)} of {len(pred)} pool images (first: "
                         f"index {bad[0]}); check the checkpoint and the normalisation (--normalize)")
    if ws.dist.is_main:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            signature = pred_checksum(pred, origin)
            if signature is None:
                raise OSError(f"no cache key could be made in {cache_dir()}")
            write_npz(path, pred=pred, made_from=np.array(json.dumps(origin)), checksum=np.array(signature))
        except (OSError, OutputError) as exc:
            print(f"warning: the teacher-pass cache {path} cannot be written ({exc}); continuing without it",
                  file=sys.stderr)
    return pred, pred == ws.pool_labels, False
