"""Content digests: of files (teacher, score file, .beton) and the per-user cache folder that remembers
which .beton files were already checked against their manifests (keyed by the file's identity:
path, inode, size and modification time, so a rebuilt file is checked again)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import sys
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


@functools.cache  # once per process and cache folder
def sweep_cache(folder: Path) -> None:
    """Removes the temp files that writers killed mid-write left in a cache folder (`.NAME.tmp-PID...` of
    processes that are gone; a kill -9 leaves them, often 0 bytes)."""
    from beton_builder.base.files import remove_stale_temps

    remove_stale_temps(folder)


KEY_BYTES = 32


def cache_key() -> bytes | None:
    """This user's secret key for signing cache entries (`key` in the cache folder, mode 0600, made
    at first use and published with a hard link, so no process ever reads half a key; a damaged key
    is replaced, which only invalidates the entries it signed). None when no key can be read or made:
    the cache is then not trusted."""
    path = cache_dir() / "key"
    for _ in range(3):
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = None
        except OSError:
            return None
        if key is not None and len(key) == KEY_BYTES:
            return key
        try:
            if key is not None:
                path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".key.tmp-{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process published one first: read theirs
                pass
            finally:
                tmp.unlink()
        except OSError:
            return None
    return None


def keyed_digest(*parts: bytes) -> str | None:
    """HMAC-SHA256 of `parts` under cache_key(): a cache entry's signature. An entry edited by hand
    with its plain checksum recomputed no longer matches it. None without a key."""
    key = cache_key()
    if key is None:
        return None
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def _identity(path: Path) -> str:
    stat = os.stat(path)
    key = f"{path.resolve()}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def digest_record(path: Path) -> Path:
    """Where the digest of `path` (as it is now: identity = path, inode, size, mtime) is remembered."""
    return cache_dir() / "checked" / _identity(path)


def known_digest(path: Path) -> str:
    """sha256 of `path`'s content, remembered per file identity (a rewrite is hashed anew). A record
    that cannot be read or does not hold a digest is reported in one line, removed and recomputed:
    the cache only ever saves time."""
    record = digest_record(path)
    value = _read_record(record)
    return value if value is not None else fresh_digest(path)


def fresh_digest(path: Path) -> str:
    """sha256 of `path` hashed now (never from the cache), and remembered for the next call."""
    value = file_sha256(path)
    record = digest_record(path)
    sweep_cache(record.parent)
    with suppress(OSError):  # the record only saves time: a cache that cannot be written is no error
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
        tmp.write_text(value)
        os.replace(tmp, record)
    return value


def _read_record(record: Path) -> str | None:
    """The digest a record holds; None when there is none or it is malformed (then it is removed,
    with a warning naming it)."""
    try:
        raw = record.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return _drop(record, f"unreadable: {exc.strerror or exc}")
    try:
        value = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return _drop(record, "not text")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        return _drop(record, f"not a sha256 digest ({len(raw)} bytes)")
    return value


def _drop(record: Path, why: str) -> None:
    print(f"warning: cache record {record} is damaged ({why}); removed, hashing the file again", file=sys.stderr)
    with suppress(OSError):
        record.unlink()
    return None


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
