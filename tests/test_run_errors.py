"""Bad input to `ccfs-fast run`: exit 2 with a one-line reason, no run output written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_args, set_flag
from formats import class_images, write_image_folder

from ccfs_fast.cli import main
from ccfs_fast.train.convnet import ConvNet


def _fails(capsys, args, *needles):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]
    assert err.startswith("ccfs-fast: error:"), err
    for needle in needles:
        assert needle in err, err


def _no_outputs(out):
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("flag,value,needles", [
    ("--image-per-class", "4", ("gives 0 distilled images per class",)),
    ("--alpha", "1.2", ("--alpha must lie strictly between 0 and 1, got 1.2",)),
    ("--alpha", "0", ("--alpha must lie strictly between 0 and 1",)),
    ("--curriculum-num", "17", ("16 real images per class to select cannot fill 17 curricula",)),
    ("--curriculum-num", "0", ("--curriculum-num must be at least 1, got 0",)),
    ("--select-method", "easiest", ("valid selection methods: hard, random, simple",)),
    ("--score", "el2n", ("unknown score kind 'el2n'",)),
])
def test_bad_settings(capsys, engine_data, tmp_path, flag, value, needles):
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), flag, value), *needles)
    _no_outputs(out)


def test_score_file_of_wrong_length(capsys, engine_data, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(799, np.float32))
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--score-path", str(tmp_path / "short.npy")),
           "has 799 values but the pool has 800 images")
    _no_outputs(out)


def test_teacher_for_wrong_number_of_classes(capsys, engine_data, tmp_path):
    torch.save({"model": ConvNet(100, 32, 32).state_dict()}, tmp_path / "t100.pt")
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--teacher", str(tmp_path / "t100.pt")),
           "has 100 output classes but the pool has 10")
    _no_outputs(out)


def test_distilled_set_with_missing_class(capsys, engine_data, tmp_path):
    x, _ = class_images(54, 9, 32, seed=3)
    write_image_folder(tmp_path / "d9", x, np.repeat(np.arange(9), 6), [f"c{i}" for i in range(9)])
    assert main(["build", "folder", "--src", str(tmp_path / "d9"), "--out", str(tmp_path / "d9.beton")]) == 0
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--distilled", str(tmp_path / "d9.beton")),
           "distilled set has 9 classes", "the pool 10")
    _no_outputs(out)


def test_distilled_class_with_too_few_images(capsys, engine_data, tmp_path):
    out = tmp_path / "out"
    # ipc 40 x alpha 0.2 = 8 distilled per class, but the folder has 6 per class.
    _fails(capsys, set_flag(run_args(engine_data, out), "--image-per-class", "40"),
           "class 'c0' (label 0) has 6 images, fewer than the 8 distilled images per class")
    _no_outputs(out)


def test_pool_and_test_with_different_class_counts(capsys, engine_data, tmp_path):
    x, y = class_images(50, 5, 32, seed=4)
    np.savez(tmp_path / "t5.npz", x=x, y=y)
    assert main(["build", "arrays", "--src", str(tmp_path / "t5.npz"), "--out", str(tmp_path / "t5.beton")]) == 0
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--test", str(tmp_path / "t5.beton")),
           "the pool has 10 classes but the test set 5")
    _no_outputs(out)


def test_missing_beton_file(capsys, engine_data, tmp_path):
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--pool", str(tmp_path / "nope.beton")),
           "no such .beton file", "ccfs-fast build")


def test_teacher_model_contradicting_the_checkpoint(capsys, engine_data, tmp_path):
    """The checkpoint made by `ccfs-fast teacher` records its arch: a contradicting --teacher-model is
    refused naming it, and without --teacher-model the recorded arch is used."""
    out = tmp_path / "out"
    _fails(capsys, set_flag(run_args(engine_data, out), "--teacher-model", "resnet18"),
           "--teacher-model resnet18", "records arch 'convnet_small'")
    _no_outputs(out)


def test_imagenet_stem_on_small_images_warns():
    from ccfs_fast.train.models import stem_warning

    assert "ImageNet stem on 32x32 images" in stem_warning("torchvision:resnet18", 32)
    assert stem_warning("resnet18", 32) is None and stem_warning("torchvision:resnet18", 224) is None
