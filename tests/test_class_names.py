"""Class names travel by name, and an export is a drop-in input for readers that label folders by their
sorted names (torchvision's ImageFolder, DD-Ranking): a pool whose class names do not sort in label
order, a distilled folder named with those names, the export read back by ImageFolder, its tensors, a
set with numeric class names 0..11 and a set with an empty class."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_all
from formats import class_images, write_cifar10, write_image_folder

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "oval", "arrow", "cross", "heart", "moon"]  # not sorted


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A finished run on a CIFAR-format pool named SHAPES, with a distilled folder named with the same
    names (built in their sorted order: its labels differ from the pool's at 8 of 10 classes); each
    distilled image's pixels are its class's pool mean, so its true class is known."""
    root = tmp_path_factory.mktemp("shapes")
    write_cifar10(root / "src", class_images(500, 10, 32, seed=1, separation=40),
                  class_images(200, 10, 32, seed=2, separation=40), SHAPES)
    x, y = class_images(60, 10, 32, seed=3, separation=40)
    order = np.argsort(y, kind="stable")
    write_image_folder(root / "distilled", x[order], y[order], SHAPES)
    betons = root / "betons"
    assert main(["build", "cifar10", "--src", str(root / "src"), "--out", str(betons)]) == 0
    assert main(["build", "folder", "--src", str(root / "distilled"), "--out", str(betons / "d.beton")]) == 0
    pool = betons / "cifar10_train.beton"
    assert main(["teacher", "--pool", str(pool), "--test", str(betons / "cifar10_test.beton"), "--model",
                 "convnet_small", "--epochs", "3", "--output", str(root / "teacher.pt")]) == 0
    out = root / "run"
    assert main(["run", "--pool", str(pool), "--test", str(betons / "cifar10_test.beton"), "--distilled",
                 str(betons / "d.beton"), "--teacher", str(root / "teacher.pt"), "--teacher-model", "convnet_small",
                 "--filter-model", "convnet_small", "--eval-model", "convnet_small", "--image-per-class", "10",
                 "--alpha", "0.4", "--curriculum-num", "2", "--score", "logits", "--epochs", "2",
                 "--lr-warmup-epochs", "0", "--num-eval", "1", "--seed", "3", "--output-dir", str(out)]) == 0
    return {"root": root, "pool": pool, "distilled": betons / "d.beton", "run": out, "x": x[order], "y": y[order]}


def test_a_distilled_folder_named_in_another_order_takes_the_labels_its_names_say(shapes_run):
    from ccfs_fast.runs.runset import open_run_set

    distilled = BetonFile.open(shapes_run["distilled"])
    assert distilled.manifest.class_names == tuple(sorted(SHAPES))  # built in sorted order: labels differ
    run = open_run_set(shapes_run["run"])
    pixels, stored_labels, _ = read_all(shapes_run["distilled"])
    for row, label in zip(run.distilled_rows, run.distilled_labels):
        folder = distilled.manifest.class_names[stored_labels[row]]
        assert SHAPES[label] == folder  # the pool label of the class its folder names
    assert np.bincount(run.distilled_labels, minlength=10).tolist() == [4] * 10
    # --classes-like gives a .beton in the pool's label order at build time
    like = shapes_run["root"] / "like.beton"
    assert main(["build", "folder", "--src", str(shapes_run["root"] / "distilled"), "--out", str(like),
                 "--classes-like", str(shapes_run["pool"])]) == 0
    like_pixels, like_labels, _ = read_all(like)
    assert BetonFile.open(like).manifest.class_names == tuple(SHAPES)
    assert np.array_equal(like_labels, shapes_run["y"]) and np.array_equal(like_pixels, shapes_run["x"])


def test_the_export_reads_back_with_the_labels_the_run_meant(shapes_run, tmp_path):
    """ImageFolder over the export gives every image the run's label; images.pt / labels.pt reload
    with weights_only to the run's pixels (normalised as the run evaluates) and labels, class-major;
    `build folder` of the export is the run's set, class names and all, and eval accepts it."""
    from torchvision.datasets import ImageFolder

    from ccfs_fast.runs.runset import open_run_set

    out = tmp_path / "export"
    assert main(["export", str(shapes_run["run"]), "--out", str(out), "--format", "all"]) == 0
    run = open_run_set(shapes_run["run"])
    folder = ImageFolder(str(out))
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_file = {r["file"]: int(r["label"]) for r in rows}
    assert len(folder.samples) == run.size
    for path, label in folder.samples:
        assert by_file[str(Path(path).relative_to(out))] == label
    assert [int(r["label"]) for r in rows] == run.labels.tolist()
    assert {r["class_name"] for r in rows if int(r["label"]) == 0} == {SHAPES[0]}
    images = torch.load(out / "images.pt", weights_only=True)
    labels = torch.load(out / "labels.pt", weights_only=True)
    order = np.argsort(run.labels, kind="stable")
    assert labels.dtype == torch.int64 and labels.tolist() == run.labels[order].tolist()
    beton_pixels, _, _ = read_all(out / "ccfs_set.beton")
    norm = json.loads((shapes_run["run"] / "state.json").read_text())["normalize"]
    want = (torch.from_numpy(beton_pixels[order]).permute(0, 3, 1, 2).float() / 255
            - torch.tensor(norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(norm["std"]).view(1, 3, 1, 1)
    assert images.shape == (run.size, 3, 32, 32) and images.dtype == torch.float32
    torch.testing.assert_close(images, want, rtol=0, atol=1e-6)
    assert [int(r["tensor_row"]) for r in rows] == np.argsort(order).tolist()
    rebuilt = tmp_path / "rebuilt.beton"
    assert main(["build", "folder", "--src", str(out), "--out", str(rebuilt)]) == 0
    assert BetonFile.open(rebuilt).manifest.class_names == tuple(SHAPES)
    rebuilt_pixels, rebuilt_labels, _ = read_all(rebuilt)
    assert np.array_equal(rebuilt_labels, run.labels[order]) and np.array_equal(rebuilt_pixels, beton_pixels[order])


def _written(run, out) -> list[tuple[str, int]]:
    """((file, label) of each image, the ImageFolder) over the folder the export writes for `run`."""
    from torchvision.datasets import ImageFolder

    from ccfs_fast.runs.set_export import _write_files, file_names

    out.mkdir()
    _write_files(run, out, file_names(run, {"distilled": "png", "pool": "png"}), True)
    folder = ImageFolder(str(out), allow_empty=True)
    return [(str(Path(p).relative_to(out)), label) for p, label in folder.samples], folder


@pytest.mark.parametrize("case", ["numeric 0..11", "empty class"])
def test_folders_sort_in_label_order_for_numeric_names_and_an_empty_class(shapes_run, tmp_path, case):
    """A set whose classes are named 0..11 (text order 0, 1, 10, 11, 2, ...) and a set with a class that
    holds no image: ImageFolder gives every image its label, every class has a folder."""
    from ccfs_fast.runs.runset import open_run_set

    run = open_run_set(shapes_run["run"])
    if case == "numeric 0..11":
        names = tuple(str(c) for c in range(12))
        pool = replace(run.pool, manifest=replace(run.pool.manifest, class_names=names, num_classes=12))
        run = replace(run, pool=pool)
        # classes 10 and 11 take the images of classes 2 and 3: labels whose text sorts before 2
        remap = np.array([0, 1, 10, 11, 4, 5, 6, 7, 8, 9])
        run = replace(run, distilled_labels=remap[run.distilled_labels], selected_labels=remap[run.selected_labels])
    else:
        keep = run.selected_labels != 3
        run = replace(run, distilled_rows=run.distilled_rows[run.distilled_labels != 3],
                      distilled_labels=run.distilled_labels[run.distilled_labels != 3], selected=run.selected[keep],
                      selected_labels=run.selected_labels[keep], curriculum=run.curriculum[keep],
                      scores=run.scores[keep])
    samples, folder = _written(run, tmp_path / "set")
    assert len(folder.classes) == len(run.class_names)  # a folder for every class, empty or not
    labels = dict(zip((s for s, _ in samples), (label for _, label in samples)))
    from ccfs_fast.runs.set_export import file_names

    names = file_names(run, {"distilled": "png", "pool": "png"})
    assert [labels[n] for n in names] == run.labels.tolist()
