"""Content digests: of files (teacher, score file, .beton) and the per-user cache folder that remembers
which .beton files were already checked against their manifests (keyed by the file's identity:
path, inode, size and modification time, so a rebuilt file is checked again)."""
from __future__ import annotations

import hashlib
import os
from contextlib import suppress
from pathlib import Path

import numpy as np


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ccfs-fast"


def _identity(path: Path) -> str:
    stat = os.stat(path)
    key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def known_digest(path: Path) -> str:
    """sha256 of `path`'s content, remembered per file identity (a rewrite is hashed anew)."""
    record = cache_dir() / "checked" / _identity(path)
    with suppress(OSError):
        value = record.read_text().strip()
        if len(value) == 64:
            return value
    value = file_sha256(path)
    with suppress(OSError):  # the record only saves time: a cache that cannot be written is no error
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, record)
    return value


def row_digests(images: np.ndarray) -> np.ndarray:
    """uint64 [n]: a 64-bit digest (blake2b) of each image's pixels, images uint8 [n, ...]; equal
    pixels give equal digests. About 1 µs per image plus its bytes."""
    out = np.empty(len(images), np.uint64)
    for i in range(len(images)):
        out[i] = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(images[i]).data, digest_size=8).digest(), "little")
    return out


def row_digest_path(beton_path: str | Path) -> Path:
    """The sidecar with a .beton's per-row pixel digests: `x.beton` -> `x.beton.rows.npz` (keys
    `digests` uint64 [n] and `beton_sha256`, the file they were computed for)."""
    return Path(f"{beton_path}.rows.npz")
