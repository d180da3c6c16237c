"""The read side of the .beton contract: a .beton opened with its checked manifest (size and content
digest), its page table and stored image sizes."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beton_builder.base.digests import digest_record, fresh_digest, known_digest
from beton_builder.base.errors import DataError
from beton_builder.ffcv_import import (
    Reader,
)
from beton_builder.manifest import Manifest, manifest_path, read_manifest


@dataclass(frozen=True)
class BetonFile:
    """A .beton with its checked manifest; `page_of_row` int64 [n]: the FFCV page (of `page_size`
    bytes) holding each row's image, and `row_bytes` the largest image's size in bytes."""

    path: Path
    manifest: Manifest
    page_of_row: np.ndarray | None = field(default=None, compare=False, repr=False)
    page_size: int = 0
    row_bytes: int = 0
    sizes: np.ndarray | None = field(default=None, compare=False, repr=False)  # int [n, 2]: (height, width) as stored

    @classmethod
    def open(cls, path: str | Path) -> BetonFile:
        path = Path(path)
        manifest = read_manifest(path)
        check_pair(path, manifest)
        try:
            reader = Reader(str(path))
        except Exception as exc:  # FFCV raises bare Exceptions / numpy errors on corrupt headers
            raise DataError(f"{path}: not a readable .beton file ({exc}); rebuild it with "
                            "`ccfs-fast build ... --overwrite`") from exc
        if reader.num_samples != manifest.n:
            raise DataError(f"{path}: holds {reader.num_samples} rows but its manifest says {manifest.n}; rebuild it")
        table = reader.alloc_table
        page_of_row = np.zeros(manifest.n, np.int64)
        page_of_row[table["sample_id"]] = table["ptr"] // reader.page_size
        image = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
        sizes = np.stack((image["height"], image["width"]), 1).astype(np.int64)
        return cls(path, manifest, page_of_row, int(reader.page_size), int(table["size"].max(initial=0)), sizes)

    @property
    def n(self) -> int:
        return self.manifest.n

    def digest(self) -> str:
        """sha256 of the file's content (the manifest's, checked at open, when it records one)."""
        return self.manifest.beton_sha256 or known_digest(self.path)


def check_pair(path: Path, manifest: Manifest) -> None:
    """A .beton and its manifest come from one build: its size and content digest match the
    manifest's record (manifests of builder version 2 and older have none)."""
    rebuild = "rebuild it with `ccfs-fast build ... --overwrite`"
    size = os.stat(path).st_size
    if manifest.beton_size is not None and size < manifest.beton_size:
        raise DataError(f"{path}: truncated: {size:,} of the {manifest.beton_size:,} bytes its manifest records "
                        f"({manifest.beton_size - size:,} missing: a copy or download cut short); copy it again, or "
                        f"{rebuild}")
    if manifest.beton_size is not None and size != manifest.beton_size:
        raise DataError(f"{path}: {size:,} bytes, but its manifest describes a .beton of {manifest.beton_size:,} "
                        f"bytes (the two come from different builds); {rebuild}")
    if manifest.beton_sha256 is None or known_digest(path) == manifest.beton_sha256:
        return
    # The remembered digest may be the stale one: hash the file itself before refusing anything.
    actual = fresh_digest(path)
    if actual == manifest.beton_sha256:
        print(f"warning: cache record {digest_record(path)} held a wrong digest of {path} (the file matches its "
              "manifest); replaced", file=sys.stderr)
        return
    beton_newer = os.stat(path).st_mtime_ns > os.stat(manifest_path(path)).st_mtime_ns
    stale = (f"the .beton was written after its manifest {manifest_path(path).name}, so the manifest is the stale one"
             if beton_newer else f"the manifest {manifest_path(path).name} was written after the .beton, so the "
             ".beton is the stale one")
    raise DataError(f"{path}: its content (sha256 {actual[:12]}...) does not match its manifest's record "
                    f"({manifest.beton_sha256[:12]}...): {stale}; {rebuild}")
