"""ccfs-fast build: every source format converts to .beton with exact pixels, labels and order."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import read_all
from formats import (
    class_images,
    make_tar_gz,
    make_zip,
    write_cifar10,
    write_cifar100,
    write_image_folder,
    write_tiny_imagenet,
)

from ccfs_fast.cli import main


def _build(*args: str) -> int:
    return main(["build", *args, "--workers", "2"])


def _manifest(beton):
    return json.loads(open(f"{beton}.json").read())


def test_cifar10_folder_roundtrip(cifar10_betons, cifar10_arrays):
    for beton, (x, y) in zip(cifar10_betons, cifar10_arrays):
        images, labels, index = read_all(beton)
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_array_equal(index, np.arange(len(x)))
        m = _manifest(beton)
        assert (m["n"], m["num_classes"], m["side"]) == (len(x), 10, 32)
        assert m["class_names"][3] == "class3"
        np.testing.assert_allclose(m["mean"], (x / 255.0).reshape(-1, 3).mean(0), rtol=1e-9)
        np.testing.assert_allclose(m["std"], (x / 255.0).reshape(-1, 3).std(0), rtol=1e-6)
        assert len(m["content_hash"]) == 64


def test_cifar10_tarball_equals_folder(tmp_path, cifar10_betons, cifar10_arrays):
    folder = write_cifar10(tmp_path / "src", *cifar10_arrays)
    archive = make_tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    assert _build("cifar10", "--src", str(archive), "--out", str(tmp_path / "out")) == 0
    for split, ref in zip(("train", "test"), cifar10_betons):
        assert _manifest(tmp_path / "out" / f"cifar10_{split}.beton")["content_hash"] == _manifest(ref)["content_hash"]
    images, labels, _ = read_all(tmp_path / "out" / "cifar10_train.beton")
    np.testing.assert_array_equal(images, cifar10_arrays[0][0])


@pytest.mark.parametrize("packed", [False, True])
def test_cifar100_fine_labels(tmp_path, packed):
    train, test = class_images(300, 100, 32, seed=5), class_images(100, 100, 32, seed=6)
    src = write_cifar100(tmp_path / "src", train, test)
    if packed:
        src = make_tar_gz(src, tmp_path / "cifar-100-python.tar.gz")
    assert _build("cifar100", "--src", str(src), "--out", str(tmp_path / "out")) == 0
    for split, (x, y) in (("train", train), ("test", test)):
        images, labels, index = read_all(tmp_path / "out" / f"cifar100_{split}.beton")
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)  # fine labels, not coarse
        np.testing.assert_array_equal(index, np.arange(len(x)))
    m = _manifest(tmp_path / "out" / "cifar100_train.beton")
    assert m["num_classes"] == 100 and m["class_names"][7] == "fine7"


@pytest.mark.parametrize("packed", [False, True])
def test_tiny_imagenet_tree_and_zip(tmp_path, packed):
    wnids = ["n0300", "n0100", "n0200"]
    top, expected = write_tiny_imagenet(tmp_path / "src", wnids, per_class=12, val_per_class=3)
    src = make_zip(top, tmp_path / "tiny-imagenet-200.zip") if packed else top.parent
    assert _build("tiny-imagenet", "--src", str(src), "--out", str(tmp_path / "out")) == 0
    for split, (x, y) in expected.items():
        images, labels, index = read_all(tmp_path / "out" / f"tiny-imagenet_{split}.beton")
        np.testing.assert_array_equal(images, x)
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_array_equal(index, np.arange(len(x)))
    m = _manifest(tmp_path / "out" / "tiny-imagenet_train.beton")
    assert m["class_names"] == sorted(wnids) and m["side"] == 64 and m["n"] == 36


def test_image_folder_per_class_and_side(tmp_path):
    x, y = class_images(60, 3, 16, seed=3)
    names = ["cat", "ant", "bee"]
    write_image_folder(tmp_path / "distilled", x, y, names)
    out = tmp_path / "d.beton"
    assert _build("folder", "--src", str(tmp_path / "distilled"), "--out", str(out), "--per-class", "4") == 0
    images, labels, _ = read_all(out)
    # ImageFolder order: classes sorted by name (ant, bee, cat); first 4 sorted files each.
    want = np.concatenate([np.flatnonzero(y == names.index(c))[:4] for c in sorted(names)])
    np.testing.assert_array_equal(images, x[want])
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 4))
    assert _manifest(out)["class_names"] == ["ant", "bee", "cat"]
    resized = tmp_path / "r.beton"
    assert _build("folder", "--src", str(tmp_path / "distilled"), "--out", str(resized), "--side", "32") == 0
    assert _manifest(resized)["side"] == 32 and _manifest(resized)["n"] == 60


def test_arrays_npz(tmp_path):
    x, y = class_images(50, 4, 8, seed=4)
    np.savez(tmp_path / "a.npz", x=x, y=y.astype(np.int32))
    assert _build("arrays", "--src", str(tmp_path / "a.npz"), "--out", str(tmp_path / "a.beton")) == 0
    images, labels, index = read_all(tmp_path / "a.beton")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, y)
    assert _manifest(tmp_path / "a.beton")["num_classes"] == 4


def test_overwrite_replaces_and_keeps_manifest_in_step(tmp_path):
    x, y = class_images(20, 2, 8, seed=7)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x[:10], y=y[:10])
    out = tmp_path / "a.beton"
    assert _build("arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)) == 0
    assert _build("arrays", "--src", str(tmp_path / "b.npz"), "--out", str(out), "--overwrite") == 0
    assert _manifest(out)["n"] == 10 and len(read_all(out)[1]) == 10
