"""Bad input to `ccfs-fast build`: a one-line reason, exit code 2, no .beton (or temp file) left."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from formats import (
    class_images,
    make_tar_gz,
    make_zip,
    write_cifar10,
    write_image_folder,
    write_tiny_imagenet,
)
from PIL import Image

from ccfs_fast.cli import main


def _fails(capsys, tmp_path, args, *needles):
    """Runs the CLI; asserts exit 2, a single stderr line holding every needle, no output files."""
    before = set(tmp_path.rglob("*"))
    assert main(["build", *args, "--workers", "2"]) == 2
    # Progress bars may precede it on stderr; the reason is the last line, and the only error line.
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]
    assert err.startswith("ccfs-fast: error:"), err
    for needle in needles:
        assert needle in err, err
    created = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert not created, created


def test_missing_cifar_folder_names_expected_layout(capsys, tmp_path):
    _fails(capsys, tmp_path, ["cifar10", "--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
           "cifar-10-batches-py", "data_batch_1")


def test_misnamed_cifar_folder(capsys, tmp_path):
    folder = write_cifar10(tmp_path, class_images(50, 10, 32, 0), class_images(10, 10, 32, 1))
    folder.rename(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "data_batch_3").rename(tmp_path / "cifar10" / "batch3")
    _fails(capsys, tmp_path, ["cifar10", "--src", str(tmp_path / "cifar10"), "--out", str(tmp_path / "o")],
           "expected the folder cifar-10-batches-py/")


def test_cifar100_given_cifar10_folder(capsys, tmp_path):
    write_cifar10(tmp_path, class_images(50, 10, 32, 0), class_images(10, 10, 32, 1))
    _fails(capsys, tmp_path, ["cifar100", "--src", str(tmp_path), "--out", str(tmp_path / "o")],
           "cifar-100-python")


def test_truncated_pickle(capsys, tmp_path):
    folder = write_cifar10(tmp_path, class_images(50, 10, 32, 0), class_images(10, 10, 32, 1))
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    _fails(capsys, tmp_path, ["cifar10", "--src", str(folder), "--out", str(tmp_path / "o")],
           "data_batch_2", "truncated or corrupt pickle")


def test_truncated_tarball(capsys, tmp_path):
    folder = write_cifar10(tmp_path / "s", class_images(500, 10, 32, 0), class_images(10, 10, 32, 1))
    archive = make_tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-4000])
    _fails(capsys, tmp_path, ["cifar10", "--src", str(archive), "--out", str(tmp_path / "o")],
           "truncated or corrupt archive")


def test_truncated_zip(capsys, tmp_path):
    top, _ = write_tiny_imagenet(tmp_path / "s", ["n01", "n02"], 3, 1)
    archive = make_zip(top, tmp_path / "tiny-imagenet-200.zip")
    archive.write_bytes(archive.read_bytes()[:200])
    _fails(capsys, tmp_path, ["tiny-imagenet", "--src", str(archive), "--out", str(tmp_path / "o")],
           "truncated or corrupt zip")


def test_tiny_missing_class_folder(capsys, tmp_path):
    top, _ = write_tiny_imagenet(tmp_path / "s", ["n01", "n02"], 3, 1)
    (top / "train" / "n02").rename(top / "train" / "n02x")
    _fails(capsys, tmp_path, ["tiny-imagenet", "--src", str(top), "--out", str(tmp_path / "o")],
           "train/n02", "class folder missing")


def test_tiny_corrupt_jpeg_names_file(capsys, tmp_path):
    top, _ = write_tiny_imagenet(tmp_path / "s", ["n01", "n02"], 3, 1)
    (top / "train" / "n01" / "images" / "n01_2.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    _fails(capsys, tmp_path, ["tiny-imagenet", "--src", str(top), "--out", str(tmp_path / "o")], "n01_2.JPEG")


def test_class_with_fewer_than_k_images_named(capsys, tmp_path):
    x, y = class_images(30, 3, 8, 0)
    y[:] = [0] * 12 + [1] * 3 + [2] * 15
    write_image_folder(tmp_path / "d", x, y, ["a", "b_short", "c"])
    _fails(capsys, tmp_path, ["folder", "--src", str(tmp_path / "d"), "--out", str(tmp_path / "d.beton"),
                              "--per-class", "5"], "'b_short'", "3 images", "--per-class 5")


def test_mixed_sizes_without_side(capsys, tmp_path, cifar10_betons):
    """Images of mixed sizes are stored as JPEG of their own sizes (a note says so and names --side);
    a run with a pool of one fixed size then refuses them, naming the --side to rebuild with."""
    from beton_builder.base.errors import DataError
    from beton_builder.beton import BetonFile
    from ccfs_fast.data.space import IndexSpace

    x, y = class_images(6, 2, 8, 0)
    write_image_folder(tmp_path / "d", x, y, ["a", "b"])
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "d" / "a" / "zz_big.png")
    assert main(["build", "folder", "--src", str(tmp_path / "d"), "--out", str(tmp_path / "d.beton")]) == 0
    err = capsys.readouterr().err
    assert "images of 2 sizes (8x8, 12x12): stored as JPEG" in err and "--side S" in err
    distilled = BetonFile.open(tmp_path / "d.beton")
    assert distilled.manifest.image_storage == "jpeg"
    with pytest.raises(DataError, match="distilled images vary in size .* rebuild the distilled set with --side 32"):
        IndexSpace(BetonFile.open(cifar10_betons[0]), distilled)


def test_folder_without_class_subfolders(capsys, tmp_path):
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    _fails(capsys, tmp_path, ["folder", "--src", str(tmp_path / "flat"), "--out", str(tmp_path / "d.beton")],
           "one sub-folder per class")


@pytest.mark.parametrize("x,y,needle", [
    (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int64), "x is float32"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int64), "x is uint8 [4, 8, 8]"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(3, np.int64), "y is int64 [3] for 4 images"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.float64), "y is float64"),
])
def test_wrong_npz(capsys, tmp_path, x, y, needle):
    np.savez(tmp_path / "bad.npz", x=x, y=y)
    _fails(capsys, tmp_path, ["arrays", "--src", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "b.beton")],
           needle)


def test_existing_output_refused_and_kept(capsys, tmp_path):
    x, y = class_images(20, 2, 8, 0)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    out = tmp_path / "a.beton"
    assert main(["build", "arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    _fails(capsys, tmp_path, ["arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)],
           "already exists", "--overwrite")
    assert out.read_bytes() == before


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits non-zero with a one-line reason."""
    proc = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", "build", "cifar10", "--src",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cifar-10-batches-py" in proc.stderr
