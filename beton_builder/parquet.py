"""Hugging Face Hub parquet reader: a dataset's local shards (`data/train-00000-of-0000N.parquet`, ...)
read in order with pyarrow, a batch at a time (never the whole table in memory).

The image column is the Hub's `Image` feature, a struct of `bytes` (the encoded file) and `path`; the
label column is found by the usual names (LABEL_COLUMNS) or given. Class names come from the
features metadata the Hub writes into each shard (`huggingface` -> info.features.<label>.names, a
`ClassLabel`); a column of class-name strings maps names to labels by the folder rule (sorted, or
numeric with --class-order numeric); plain integers are their own labels. Images of one square size
are decoded and stored raw, as `build folder` does; otherwise they are streamed into a JPEG .beton,
as `build imagenet` does."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from beton_builder.base.errors import BuildError
from beton_builder.image_folder import class_order
from beton_builder.images import ImageRef, decode_images, image_size, uniform_square, varying_note
from beton_builder.labels import check_labels, inferred_class_count, whole_labels
from beton_builder.table import ImageTable

LABEL_COLUMNS = ("label", "labels", "fine_label", "class_id", "class", "target", "targets", "cls", "coarse_label")
EXPECTED = ("expected Hub parquet shards (a folder of *.parquet, or the files) with an image column (struct of bytes "
            "and path) and an integer or class-name label column")
SCAN_ROWS = 1024  # rows read per batch


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # a dependency of the package: only a broken install lacks it
        raise BuildError("`build parquet` needs pyarrow; reinstall ccfs-fast (pip install -e .)") from exc
    return pq


def open_shard(shard: Path):
    """pyarrow's ParquetFile of a shard; a file cut short, empty or not parquet at all is one BuildError."""
    pq = _pyarrow()
    import pyarrow as pa

    try:
        return pq.ParquetFile(shard)
    except (pa.ArrowException, OSError) as exc:
        size = shard.stat().st_size if shard.is_file() else 0
        what = ("empty (0 bytes)" if size == 0 else
                f"not a whole parquet file ({size:,} bytes: cut short, or another format)")
        raise BuildError(f"{shard}: {what} ({' '.join(str(exc).split())[:120]}); download the shard again") from exc


def read_failure(shard: Path, exc: Exception) -> BuildError:
    """A shard whose footer reads but whose data does not (damaged pages)."""
    return BuildError(f"{shard}: its data cannot be read ({' '.join(str(exc).split())[:120]}); the shard is damaged: "
                      "download it again")


def shard_paths(sources: tuple[Path, ...], split: str | None) -> list[Path]:
    """The shards in order: the files as given, or a folder's *.parquet (recursively) sorted by path.
    A folder holding several splits (train-*, test-*, ...) needs `split` unless one is called train."""
    files: list[Path] = []
    for src in sources:
        if src.is_dir():
            files += sorted(src.rglob("*.parquet"))
        elif src.is_file():
            files.append(src)
        else:
            raise BuildError(f"{src}: no such file or folder; {EXPECTED}")
    if not files:
        raise BuildError(f"{sources[0]}: no .parquet files; {EXPECTED}")
    splits = sorted({_split_of(p) for p in files})
    if split is not None:
        files = [p for p in files if _split_of(p) == split]
        if not files:
            raise BuildError(f"--split {split}: no shard named {split}-*.parquet (splits found: {', '.join(splits)})")
    elif len(splits) > 1:
        if "train" not in splits:
            raise BuildError(f"{sources[0]}: shards of several splits ({', '.join(splits)}); pass --split NAME")
        files = [p for p in files if _split_of(p) == "train"]
        print(f"note: {sources[0]} holds the splits {', '.join(splits)}; reading train (--split to choose)",
              file=sys.stderr)
    return files


def _split_of(shard: Path) -> str:
    """The split a Hub shard belongs to: `train-00000-of-00002.parquet` -> train."""
    return shard.name.split("-")[0].split(".")[0]


def hub_features(schema) -> dict:
    """The Hub's features metadata of a shard ({} when it has none)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}


def find_label_column(schema, features: dict, given: str | None, path: Path) -> str:
    names = schema.names
    if given is not None:
        if given not in names:
            raise BuildError(f"{path}: no column {given!r} (columns: {', '.join(names)}); pass --label-column NAME")
        return given
    class_labels = [n for n in names if (features.get(n) or {}).get("_type") == "ClassLabel"]
    for candidates in ([n for n in LABEL_COLUMNS if n in class_labels], class_labels,
                       [n for n in LABEL_COLUMNS if n in names]):
        if candidates:
            return candidates[0]
    raise BuildError(f"{path}: no label column among {', '.join(names)} (looked for {', '.join(LABEL_COLUMNS)}); "
                     "pass --label-column NAME")


def struct_fields(arrow_type) -> list[str]:
    """The field names of a struct column type ([] for any other type)."""
    import pyarrow as pa

    return [arrow_type.field(i).name for i in range(arrow_type.num_fields)] if pa.types.is_struct(arrow_type) else []


def image_bytes(column) -> list[bytes | None]:
    """The encoded images of an image column: the Hub's struct (bytes, path) or plain binary."""
    return (column.field("bytes") if "bytes" in struct_fields(column.type) else column).to_pylist()


class ParquetImages:
    """The rows of Hub parquet shards as an image source (sources.ImageSource): their encoded bytes a
    chunk at a time, names ('<image path>' or '<shard>#<row>'), labels and class names."""

    def __init__(self, shards: list[Path], image_column: str, names: list[str], labels: np.ndarray,
                 class_names: tuple[str, ...]):
        self.shards, self.image_column = shards, image_column
        self.root, self.names, self.labels, self.class_names = shards[0].parent, names, labels, class_names
        self.source_kind = "hub-parquet"
        self.stamps = np.asarray([(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in shards], np.int64)
        self.rows = [open_shard(p).metadata.num_rows for p in shards]

    @property
    def n(self) -> int:
        return len(self.labels)

    def chunks(self, start: int, size: int) -> Iterator[tuple[int, list[bytes]]]:
        import pyarrow as pa

        offset = 0
        for shard, rows in zip(self.shards, self.rows):
            if offset + rows <= start:
                offset += rows
                continue
            file = open_shard(shard)
            groups, first = [], offset
            for g in range(file.metadata.num_row_groups):  # skip whole row groups before `start`
                count = file.metadata.row_group(g).num_rows
                if first + count <= start and not groups:
                    first += count
                    continue
                groups.append(g)
            batches = file.iter_batches(batch_size=size, columns=[self.image_column], row_groups=groups)
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowException, OSError) as exc:
                    raise read_failure(shard, exc) from exc
                if batch is None:
                    break
                blobs = image_bytes(batch.column(0))
                skip = max(0, start - first)
                if skip < len(blobs):
                    yield first + skip, [self._present(b, first + k) for k, b in enumerate(blobs) if k >= skip]
                first += len(blobs)
            offset += rows

    def _present(self, blob: bytes | None, row: int) -> bytes:
        if blob is None:
            raise BuildError(f"{self.names[row]}: row {row} has no image bytes; download the shards with their "
                             "images embedded (the Hub's default)")
        return blob

    def refs(self) -> list[ImageRef]:
        """Every row as an ImageRef holding its bytes (for sets decoded into memory)."""
        return [ImageRef(self.names[first + k], data=b) for first, blobs in self.chunks(0, SCAN_ROWS)
                for k, b in enumerate(blobs)]


def scan(shards: list[Path], image_column: str, label_column: str | None
         ) -> tuple[list[str], list, str, dict, object]:
    """(row names, raw label values, label column, its features entry, the label column's arrow type)
    over every shard, reading the label column and the image paths only."""
    names, values = [], []
    chosen = features_entry = label_type = None
    for shard in shards:
        file = open_shard(shard)
        schema = file.schema_arrow
        if image_column not in schema.names:
            raise BuildError(f"{shard}: no image column {image_column!r} (columns: {', '.join(schema.names)}); pass "
                             "--image-column NAME")
        features = hub_features(schema)
        column = find_label_column(schema, features, label_column, shard)
        if chosen is not None and column != chosen:
            raise BuildError(f"{shard}: its label column is {column!r} but the first shard's is {chosen!r}")
        chosen, features_entry, label_type = column, features.get(column) or features_entry, schema.field(column).type
        has_path = "path" in struct_fields(schema.field(image_column).type)
        columns = [column] + ([f"{image_column}.path"] if has_path else [])
        row = 0
        for batch in _batches(file, shard, columns):
            values += batch.column(0).to_pylist()
            paths = batch.column(1).field("path").to_pylist() if has_path else [None] * batch.num_rows
            names += [p or f"{shard.name}#{row + k}" for k, p in enumerate(paths)]
            row += batch.num_rows
    return names, values, chosen, features_entry or {}, label_type


def _batches(file, shard: Path, columns: list[str]):
    """The shard's batches of `columns`, SCAN_ROWS rows at a time; damaged data is one BuildError."""
    import pyarrow as pa

    try:
        yield from file.iter_batches(batch_size=SCAN_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise read_failure(shard, exc) from exc


def to_labels(values: list, features: dict, order: str | None, column: str, src: Path
              ) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels int64, class names): ClassLabel names from the metadata, class-name strings by the
    folder rule, plain integers as they are."""
    if any(v is None for v in values):
        raise BuildError(f"{src}: column {column!r} has {sum(v is None for v in values)} rows without a label")
    if values and isinstance(values[0], str):
        names = tuple(class_order(sorted(set(values)), order, src))
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[v] for v in values], np.int64), names
    where = f"{src}: column {column!r}"
    labels = whole_labels(np.asarray(values), where)
    names = tuple(str(n) for n in features.get("names") or ())
    if not names:
        names = tuple(str(c) for c in range(inferred_class_count(labels, where, "--label-column with a ClassLabel "
                                                                               "column (the Hub's class names)")))
    check_labels(labels, len(names), where, " named in the shards' metadata",
                 "fix the labels (an unlabelled split, -1, cannot be built)")
    return labels, names


def read_parquet(sources: tuple[Path, ...], image_column: str, label_column: str | None, order: str | None,
                 workers: int, split: str | None = None) -> ImageTable | ParquetImages:
    """The rows of the shards in order: decoded (one square size) or as a stream (varying sizes)."""
    shards = shard_paths(tuple(Path(s) for s in sources), split)
    names, values, column, features, _ = scan(shards, image_column, label_column)
    if not names:
        raise BuildError(f"{shards[0]}: the shards hold no rows; {EXPECTED}")
    labels, class_names = to_labels(values, features, order, column, shards[0])
    source = ParquetImages(shards, image_column, names, labels, class_names)
    sizes = []
    for first, blobs in source.chunks(0, SCAN_ROWS):  # headers only, a batch at a time
        for k, blob in enumerate(blobs):
            size = image_size(ImageRef(names[first + k], data=blob))
            if isinstance(size, str):
                raise BuildError(size)
            sizes.append(size)
    if not uniform_square(sizes):
        print(varying_note(sizes, f"parquet {shards[0].parent}", resize_flag=False), file=sys.stderr)
        return source
    images = decode_images(source.refs(), None, workers, f"parquet {shards[0].parent.name}")
    return ImageTable(images, labels, class_names, "hub-parquet", str(shards[0].parent))
