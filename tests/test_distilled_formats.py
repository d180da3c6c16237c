"""Distilled sets as the field publishes them: `.pt` tensor pairs (trajectory matching, DD-Ranking) and
Hugging Face Hub parquet shards, plus image folders of varying size; written in those exact formats
(torch.save, pyarrow with the Hub's metadata), built through the CLI, and a whole run on each."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import one_line_error, read_all, run_args, set_flag
from formats import MTT_CIFAR10, class_images, write_hub_parquet, write_image_folder, write_tensor_pair

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main
from ccfs_fast.data.readers import read_labels


def _build(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["build", *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def distilled_pixels():
    """uint8 [40, 32, 32, 3] distilled-looking images, 4 per class, in class order."""
    x, _ = class_images(40, 10, 32, seed=7)
    return x, np.repeat(np.arange(10), 4)


@pytest.mark.parametrize("form", ["pair", "soft", "dict", "tuple"])
def test_tensor_files_round_trip_exactly(tmp_path, capsys, distilled_pixels, form):
    """uint8 -> normalised float tensors -> build tensors gives the same pixels bit for bit; integer
    labels as they are, soft labels [N, C] by their argmax (with a note); one file holding a dict or a
    tuple of both loads too."""
    x, y = distilled_pixels
    images, labels = write_tensor_pair(tmp_path, x, y, soft_classes=10 if form == "soft" else None)
    args = ["tensors", "--images", str(images), "--out", str(tmp_path / "d.beton"), "--normalized-with", "cifar10"]
    if form in ("pair", "soft"):
        args += ["--labels", str(labels)]
    else:
        both = {"images": torch.load(images), "labels": torch.load(labels)}
        torch.save(both if form == "dict" else (both["images"], both["labels"]), tmp_path / "both.pt")
        args[2] = str(tmp_path / "both.pt")
    code, err = _build(capsys, *args)
    assert code == 0, err
    pixels, read_labels, _ = read_all(tmp_path / "d.beton")
    assert np.array_equal(pixels, x) and np.array_equal(read_labels, y)
    manifest = BetonFile.open(tmp_path / "d.beton").manifest
    assert manifest.class_names == tuple(str(c) for c in range(10)) and manifest.source_kind == "tensors"
    assert ("soft labels [40, 10]" in err) == (form == "soft")
    assert "clipped" not in err


def test_wrong_normalisation_is_reported_as_clipping(tmp_path, capsys, distilled_pixels):
    x, y = distilled_pixels
    images, labels = write_tensor_pair(tmp_path, x, y)
    code, err = _build(capsys, "tensors", "--images", str(images), "--labels", str(labels), "--out",
                       str(tmp_path / "d.beton"), "--normalized-with", "none")
    assert code == 0
    note = next(ln for ln in err.splitlines() if "were clipped" in ln)
    assert "the wrong --normalized-with" in note and "ZCA" in note


class _Payload:
    """A pickled object whose loading would run code (creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tensor_refusals(tmp_path, x, y) -> dict[str, tuple[list[str], str]]:
    """name -> (extra build args, what the one-line error must say), each over files written here."""
    good_x, good_y = write_tensor_pair(tmp_path / "good", x, y)
    base = torch.load(good_x)
    cases = {"rank": (base[:, 0], "expected [N, 3, H, W]"), "channels": (base[:, :1], "expected [N, 3, H, W]"),
             "nan": (base.clone().index_fill_(0, torch.tensor([3]), float("nan")), "1 of 40 images hold NaN")}
    out = {}
    for name, (images, needle) in cases.items():
        torch.save(images, tmp_path / f"{name}.pt")
        out[name] = (["--images", str(tmp_path / f"{name}.pt"), "--labels", str(good_y)], needle)
    torch.save(torch.arange(39), tmp_path / "short.pt")
    out["label count"] = (["--images", str(good_x), "--labels", str(tmp_path / "short.pt")], "39 labels for 40 images")
    out["label range"] = (["--images", str(good_x), "--labels", str(good_y), "--classes", "5"],
                          "label 5 at row 20 lies outside 0..4 (5 classes")
    out["no labels"] = (["--images", str(good_x)], "pass --labels")
    torch.save({"images": base, "labels": torch.from_numpy(y), "trap": _Payload(str(tmp_path / "ran"))},
               tmp_path / "pickle.pt")
    out["pickle"] = (["--images", str(tmp_path / "pickle.pt")], "not a file of tensors")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    out["garbage"] = (["--images", str(tmp_path / "garbage.pt"), "--labels", str(good_y)], "not a torch.save file")
    return out


def test_bad_tensor_files_are_refused_in_one_line(tmp_path, capsys, distilled_pixels):
    """Wrong rank or channel count, NaN, a label count that differs, labels outside 0..C-1, no labels,
    a pickle that is not tensors (refused without running it), a file that is no torch.save: one line
    each, exit 2, nothing written."""
    for name, (args, needle) in _tensor_refusals(tmp_path, *distilled_pixels).items():
        out = tmp_path / f"{name.replace(' ', '_')}.beton"
        code, err = _build(capsys, "tensors", *args, "--out", str(out), "--normalized-with", "cifar10")
        assert code == 2, name
        one_line_error(err, needle)
        assert not out.exists() and "Traceback" not in err, name
    assert not (tmp_path / "ran").exists()  # the payload never ran


@pytest.fixture(scope="module")
def hub_set(tmp_path_factory, distilled_pixels):
    x, y = distilled_pixels
    root = tmp_path_factory.mktemp("hub")
    names = [f"class_{c}" for c in range(10)]
    write_hub_parquet(root, list(x), y, names, shards=2)
    return root, names


def test_hub_parquet_shards_round_trip(tmp_path, capsys, distilled_pixels, hub_set):
    """Two shards (PNG bytes, row groups of 3) read in order: the pixels exactly, the labels, and the
    class names from the features metadata; the folder or the shard files both work."""
    x, y = distilled_pixels
    root, names = hub_set
    shards = sorted((root / "data").glob("*.parquet"))
    for src in ([str(root)], [str(s) for s in shards]):
        out = tmp_path / f"p{len(src)}.beton"
        code, err = _build(capsys, "parquet", "--src", *src, "--out", str(out))
        assert code == 0, err
        pixels, labels, _ = read_all(out)
        assert np.array_equal(pixels, x) and np.array_equal(labels, y)
        manifest = BetonFile.open(out).manifest
        assert manifest.class_names == tuple(names) and manifest.image_storage == "raw"


def test_parquet_label_columns_and_refusals(tmp_path, capsys, distilled_pixels):
    """The label column by the usual names (fine_label here, no metadata: names 0..C-1) or given; a
    column of class-name strings ordered by the folder rule; missing columns and unlabelled rows refused
    in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = distilled_pixels
    write_hub_parquet(tmp_path / "fine", list(x), y, None, label_column="fine_label")
    code, err = _build(capsys, "parquet", "--src", str(tmp_path / "fine"), "--out", str(tmp_path / "f.beton"))
    assert code == 0, err
    assert np.array_equal(read_all(tmp_path / "f.beton")[1], y)
    assert BetonFile.open(tmp_path / "f.beton").manifest.class_names == tuple(str(c) for c in range(10))
    code, err = _build(capsys, "parquet", "--src", str(tmp_path / "fine"), "--out", str(tmp_path / "g.beton"),
                       "--label-column", "nope")
    assert code == 2
    one_line_error(err, "no column 'nope'", "fine_label")
    shard = next((tmp_path / "fine" / "data").glob("*.parquet"))
    table = pq.read_table(shard)
    words = pa.array([["dog", "cat", "bird"][int(v) % 3] for v in table.column("fine_label").to_pylist()])
    (tmp_path / "words").mkdir()
    pq.write_table(table.drop(["fine_label"]).append_column("label", words), tmp_path / "words" / "train.parquet")
    code, err = _build(capsys, "parquet", "--src", str(tmp_path / "words"), "--out", str(tmp_path / "w.beton"))
    assert code == 0, err
    assert BetonFile.open(tmp_path / "w.beton").manifest.class_names == ("bird", "cat", "dog")  # sorted
    (tmp_path / "unlabelled").mkdir()
    pq.write_table(table.set_column(1, "fine_label", pa.array([-1] * table.num_rows)),
                   tmp_path / "unlabelled" / "test.parquet")
    code, err = _build(capsys, "parquet", "--src", str(tmp_path / "unlabelled"), "--out", str(tmp_path / "u.beton"))
    assert code == 2
    one_line_error(err, "unlabelled split")
    code, err = _build(capsys, "parquet", "--src", str(tmp_path / "fine"), "--out", str(tmp_path / "i.beton"),
                       "--image-column", "img")
    assert code == 2
    one_line_error(err, "no image column 'img'")


def _varying(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = rng.integers(40, 96, 2)
        base = rng.integers(0, 256, 3)
        out.append(np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def test_images_of_varying_size_are_stored_as_jpeg(tmp_path, capsys):
    """A folder (an RDED-style wnid folder) or Hub shards of images of varying size: stored as JPEG, each
    at its own size, as `build imagenet` does (with a note), the rows within JPEG error of the sources
    and their names recorded; `--side` still resizes a folder to raw SxS."""
    from beton_builder.manifest import recorded_names

    images = _varying(12, 3)
    labels = np.repeat(np.arange(3), 4)
    wnids = ["n01440764", "n01443537", "n01484850"]
    write_image_folder(tmp_path / "rded", images, labels, wnids)
    write_hub_parquet(tmp_path / "hub", images, labels, wnids)
    for kind, src in (("folder", tmp_path / "rded"), ("parquet", tmp_path / "hub")):
        out = tmp_path / f"{kind}.beton"
        code, err = _build(capsys, kind, "--src", str(src), "--out", str(out))
        assert code == 0, err
        assert "images of 12 sizes" in err and "stored as JPEG" in err
        manifest = BetonFile.open(out).manifest
        assert manifest.image_storage == "jpeg" and manifest.class_names == tuple(wnids)
        beton = BetonFile.open(out)
        assert [tuple(s) for s in beton.sizes] == [img.shape[:2] for img in images]
        assert np.array_equal(read_labels(beton), labels)
        names = recorded_names(out)
        assert names is not None and len(names) == 12
    code, err = _build(capsys, "folder", "--src", str(tmp_path / "rded"), "--out", str(tmp_path / "s.beton"),
                       "--side", "48")
    assert code == 0 and BetonFile.open(tmp_path / "s.beton").manifest.image_storage == "raw"


def test_whole_runs_with_a_tensor_and_a_parquet_distilled_set(engine_data, tmp_path, capsys):
    """The engine's distilled folder re-published as a `.pt` pair and as Hub shards: each builds to the
    same pixels and labels, and a whole CPU run on each selects exactly what the run on the folder
    selects (the same distilled images in the same order)."""
    pixels, labels, _ = read_all(engine_data["distilled"])
    write_tensor_pair(tmp_path / "pt", pixels, labels, MTT_CIFAR10)
    write_hub_parquet(tmp_path / "hub", list(pixels), labels, None)
    built = {"pt": tmp_path / "pt.beton", "hub": tmp_path / "hub.beton"}
    assert _build(capsys, "tensors", "--images", str(tmp_path / "pt" / "images_best.pt"), "--labels",
                  str(tmp_path / "pt" / "labels_best.pt"), "--normalized-with", "cifar10", "--out",
                  str(built["pt"]))[0] == 0
    assert _build(capsys, "parquet", "--src", str(tmp_path / "hub"), "--out", str(built["hub"]))[0] == 0
    quick = ("--num-eval", "1", "--epochs", "2")
    selections = {}
    for name, distilled in {"folder": engine_data["distilled"], **built}.items():
        args = set_flag(run_args(engine_data, tmp_path / f"run_{name}", *quick), "--distilled", str(distilled))
        assert main(args) == 0, name
        selections[name] = json.loads((tmp_path / f"run_{name}" / "selected_indices.json").read_text())
        assert selections[name]["complete"]
    assert selections["pt"]["idx_selected"] == selections["folder"]["idx_selected"]
    assert selections["hub"]["idx_selected"] == selections["folder"]["idx_selected"]
