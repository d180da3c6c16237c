"""Arrays reader: an .npz with x uint8 [n, h, w, 3] and y int [n] (optional class_names)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.labels import check_labels, inferred_class_count
from beton_builder.table import ImageTable

EXPECTED = "expected an .npz with x uint8 [n, h, w, 3] and y integer [n]"


def read_arrays(src: str | Path) -> ImageTable:
    src = Path(src)
    if not src.is_file():
        raise BuildError(f"{src}: no such file; {EXPECTED}")
    try:
        with np.load(src, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise BuildError(f"{src}: keys {sorted(npz.files)}; {EXPECTED}")
            x, y = npz["x"], npz["y"]
            names = tuple(str(n) for n in npz["class_names"]) if "class_names" in npz else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise BuildError(f"{src}: truncated or corrupt .npz ({exc}); {EXPECTED}") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise BuildError(f"{src}: x is {x.dtype} {list(x.shape)}; {EXPECTED}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise BuildError(f"{src}: y is {y.dtype} {list(y.shape)} for {len(x)} images; {EXPECTED}")
    if names is None:
        names = tuple(str(i) for i in range(inferred_class_count(y, str(src), "class_names in the .npz")))
    check_labels(y, len(names), str(src), " named by class_names in the .npz")
    return ImageTable(np.ascontiguousarray(x), y.astype(np.int64), names, "arrays", str(src))
