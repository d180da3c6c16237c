"""`ccfs-fast export`: a run's final synthetic set (the distilled images it used, then the real images it
selected) as the field hands sets around: an image folder (one sub-folder per class, named by its
zero-padded label index so that every reader sorts them in label order, the class names in
classes.csv), a `.beton` that `run`, `eval` and FFCV read directly, the tensors of set_tensors, and
manifest.csv.

Raw images are written as PNG (lossless), a JPEG .beton's images as their stored JPEG bytes (never
re-encoded). File names keep the set's order and say the source: `000042_pool_0012345.png`,
`000003_distilled_0000003.png`. The folder, in ImageFolder order (classes, then file names), holds the
set in the run's order within each class; the .beton keeps the run's exact order, so training on it
(`eval --train-set`) repeats the run's final evaluation (where the pool and the distilled set are
stored alike: a raw distilled set beside a JPEG pool goes into the .beton as JPEG). Everything is
written into a temporary folder beside the output and renamed into place at the end: a failure or
Ctrl-C leaves nothing half-written."""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from beton_builder.base.errors import ConfigError, OutputError
from beton_builder.base.files import output_error, pid_alive
from beton_builder.base.tables import format_table
from beton_builder.image_folder import CLASS_INDEX
from ccfs_fast.runs.config import ExportConfig
from ccfs_fast.runs.run_inputs import read_run_json
from ccfs_fast.runs.runset import RunSet, images, open_run_set
from ccfs_fast.runs.set_tensors import check_tensor_export, tensor_rows, write_tensors

BETON_NAME = "ccfs_set.beton"
MANIFEST_COLUMNS = ("position", "file", "label", "class_name", "source", "pool_index", "distilled_row", "curriculum",
                    "score", "tensor_row")


def class_folder(label: int, num_classes: int) -> str:
    """Class `label`'s folder: its label index zero-padded (`000`, `001`, ...), so that the folders
    sort in label order whatever the dataset calls its classes (torchvision's ImageFolder and
    DD-Ranking label folders by their sorted names); the names are in classes.csv and manifest.csv."""
    return f"{label:0{max(3, len(str(num_classes - 1)))}d}"


def file_names(run: RunSet, extension: dict[str, str]) -> list[str]:
    """Each image's path in the folder, in the set's order: <label>/<position>_<source>_<id>.<ext>."""
    names, labels = [], run.labels
    width = max(6, len(str(run.size)))
    ids = [("distilled", int(r)) for r in run.distilled_rows] + [("pool", int(i)) for i in run.selected]
    classes = len(run.class_names)
    for position, ((source, ident), label) in enumerate(zip(ids, labels)):
        names.append(f"{class_folder(int(label), classes)}/{position:0{width}d}_{source}_{ident:07d}."
                     f"{extension[source]}")
    return names


def write_class_index(run: RunSet, folder: Path) -> None:
    """A folder for every class (an empty class too: no label shifts) and classes.csv (folder, label,
    class_name), which `build folder` of the export reads to keep the names."""
    classes = len(run.class_names)
    with open(folder / CLASS_INDEX, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["folder", "label", "class_name"])
        for label, name in enumerate(run.class_names):
            (folder / class_folder(label, classes)).mkdir(exist_ok=True)
            writer.writerow([class_folder(label, classes), label, name])


def manifest_rows(run: RunSet, names: list[str], tensors: bool = False) -> list[dict]:
    """One row per image, in the set's order (`file`: its path in the folder; `tensor_row`: its row in
    images.pt / labels.pt when written)."""
    rows = []
    distilled = len(run.distilled_rows)
    in_tensors = tensor_rows(run.labels)
    for position, (name, label) in enumerate(zip(names, run.labels)):
        real = position - distilled
        rows.append({"position": position, "file": name, "label": int(label), "class_name": run.class_names[label],
                     "source": "distilled" if real < 0 else "pool",
                     "pool_index": "" if real < 0 else int(run.selected[real]),
                     "distilled_row": int(run.distilled_rows[position]) if real < 0 else "",
                     "curriculum": 0 if real < 0 else int(run.curriculum[real]),
                     "score": "" if real < 0 or np.isnan(run.scores[real]) else float(run.scores[real]),
                     "tensor_row": int(in_tensors[position]) if tensors else ""})
    return rows


def _sources(run: RunSet):
    """(source name, image) of every image of the set, in order."""
    for image in images(run.distilled, run.distilled_rows):
        yield "distilled", image
    for image in images(run.pool, run.selected):
        yield "pool", image


def _encoded(image: np.ndarray | bytes) -> bytes:
    """The file's bytes: a JPEG's own bytes, raw pixels as PNG."""
    if isinstance(image, bytes):
        return image
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_files(run: RunSet, folder: Path, names: list[str], want_folder: bool) -> tuple[list, list]:
    """Writes the image files (when `want_folder`) and returns (pixels of a raw set or None per image,
    encoded bytes per image), what the .beton is made from."""
    pixels, encoded = [], []
    if want_folder:
        write_class_index(run, folder)
    for name, (_, image) in tqdm(zip(names, _sources(run)), total=run.size, desc="export", unit="img",
                                 disable=run.size < 2000):
        data = _encoded(image)
        if want_folder:
            path = folder / name
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        pixels.append(None if isinstance(image, bytes) else image)
        encoded.append(data)
    return pixels, encoded


def _write_beton(run: RunSet, folder: Path, names: list[str], pixels: list, encoded: list, workers: int) -> None:
    """The set as a .beton in the run's order: raw (the pixels) when every image is raw, else JPEG
    (stored JPEG bytes kept as they are; raw images encoded)."""
    from beton_builder.table import ImageTable

    out = folder / BETON_NAME
    if all(p is not None for p in pixels):
        from beton_builder.writer import write_beton

        table = ImageTable(np.stack(pixels), run.labels, run.class_names, "ccfs-export", str(run.run_dir),
                           run.pool.manifest.dataset)
        write_beton(table, out, False, workers)
        return
    from beton_builder.jpeg_writer import JpegSettings, write_jpeg_beton
    from beton_builder.sources import EncodedImages

    quality = run.pool.manifest.jpeg_quality or JpegSettings().quality
    settings = JpegSettings(max(run.pool.manifest.side, run.distilled.manifest.side), quality, keep_jpeg=True)
    source = EncodedImages(run.run_dir, names, run.labels, run.class_names, encoded)
    write_jpeg_beton(source, out, settings, workers, run.pool.manifest.dataset)


EXPORT_MARKER = ".ccfs-fast-export"  # in every export (and its temporary folder): what --overwrite may replace


def protected_places(run_dir: Path, inputs: list[Path]) -> list[tuple[str, Path]]:
    """(what it is, path) of the places an export may never replace, nor a folder holding one: the run
    being exported, its inputs, the current directory and the home directory."""
    places = [("the run being exported", run_dir), ("the current directory", Path.cwd()),
              ("the home directory", Path.home())]
    return places + [("an input of the run", p) for p in inputs]


def check_replaceable(out: Path, overwrite: bool, run_dir: Path, inputs: list[Path]) -> None:
    """Refuses an --out that would destroy what this tool did not write: one of protected_places or a
    folder above one; an existing --out without --overwrite; with --overwrite, anything but an earlier
    export (a folder holding EXPORT_MARKER) or an empty folder. The refusal names what is there."""
    target = out.resolve()
    places = [(what, place.resolve()) for what, place in protected_places(run_dir, inputs)]
    for what, place in places:
        if target == place:
            raise ConfigError(f"--out {out} is {what}; an export never replaces it: choose a new folder for --out")
    for what, place in places:
        if target in place.parents:
            raise ConfigError(f"--out {out} holds {what} ({place}); an export never replaces it: choose a new folder "
                              "for --out")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace an earlier export, or choose another "
                          "--out")
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"--out {out} is a file, not an earlier export; --overwrite replaces only an export's "
                          "folder: choose another --out")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not (out / EXPORT_MARKER).is_file():
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ConfigError(f"--out {out} holds {len(entries)} entries that no `ccfs-fast export` wrote ({shown}); "
                          "--overwrite replaces only an earlier export: choose another --out")


def remove_dead_exports(out: Path) -> list[Path]:
    """Removes what killed exports into `out` left beside it (`.NAME.tmp-PID/`, `.NAME.old-PID/` of
    processes that are gone, each holding EXPORT_MARKER); returns them."""
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)", path.name)
        if match and not pid_alive(int(match[2])) and (path / EXPORT_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def export_run(cfg: ExportConfig) -> dict:
    """Writes the run's set to cfg.out (see the module docstring); returns what was written."""
    run = open_run_set(cfg.run_dir, dict(cfg.relocated))
    if not run.complete and not cfg.allow_incomplete:
        raise ConfigError(f"{cfg.run_dir} is an unfinished run ({run.phases_done} curricula done); finish it with "
                          "`ccfs-fast run --resume` or pass --allow-incomplete to export it as it is")
    check_replaceable(cfg.out, cfg.overwrite, cfg.run_dir, [run.pool.path, run.distilled.path, *run.input_places])
    normalize = read_run_json(cfg.run_dir, "state.json").get("normalize")
    variable = run.distilled.manifest.variable_size or run.pool.manifest.variable_size
    if cfg.format in ("tensors", "all"):
        check_tensor_export(variable, normalize, cfg.run_dir)
    extension = {"distilled": "jpg" if run.distilled.manifest.variable_size else "png",
                 "pool": "jpg" if run.pool.manifest.variable_size else "png"}
    names = file_names(run, extension)
    out = cfg.out.resolve()  # `--out .` has no name to put a temporary folder beside
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for left in remove_dead_exports(out):
            print(f"note: removed {left}, left by an interrupted export", file=sys.stderr)
        tmp.mkdir()
        marker = {"tool": "ccfs-fast export", "run_dir": str(cfg.run_dir.resolve()), "format": cfg.format}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker) + "\n")
        pixels, encoded = _write_files(run, tmp, names, cfg.format in ("folder", "both", "all"))
        if cfg.format in ("beton", "both", "all"):
            _write_beton(run, tmp, names, pixels, encoded, cfg.workers)
        if cfg.format in ("tensors", "all"):
            write_tensors(tmp, pixels, run.labels, normalize)
        _write_manifest(tmp / "manifest.csv", manifest_rows(run, names, cfg.format in ("tensors", "all")))
        _put_in_place(tmp, out, cfg.overwrite)
    except (OSError, OutputError) as exc:  # named as --out, never as the temporary folder inside it
        raise output_error(cfg.out, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"images": run.size, "distilled": len(run.distilled_rows), "real": len(run.selected),
               "classes": len(run.class_names), "folder": cfg.format in ("folder", "both", "all"),
               "beton": cfg.format in ("beton", "both", "all"), "tensors": cfg.format in ("tensors", "all"),
               "out": str(cfg.out)}
    print(format_table(["images", "distilled", "real", "classes", "out"],
                       [(run.size, len(run.distilled_rows), len(run.selected), len(run.class_names), str(cfg.out))]))
    if summary["beton"]:
        print(f"train on it: ccfs-fast eval --run-dir {cfg.run_dir} --train-set {cfg.out / BETON_NAME}",
              file=sys.stderr)
    return summary


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _put_in_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames the finished folder to `out`; an existing `out` (with --overwrite: an earlier export,
    checked again now) is moved aside first and removed after, so `out` is always either the old export
    or the new one, whole."""
    old = None
    if out.exists():
        if not overwrite or not ((out / EXPORT_MARKER).is_file() or not any(out.iterdir())):
            raise OutputError(f"{out} appeared while exporting and is not an earlier export; choose another --out")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
