"""Shared fixtures: small datasets in the real on-disk formats, converted once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from formats import class_images, write_cifar10  # noqa: E402

SHARED_SCORES = Path(__file__).resolve().parents[1].parent / "shared" / "scores"


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def cifar10_arrays():
    return class_images(600, 10, 32, seed=1), class_images(200, 10, 32, seed=2)


@pytest.fixture(scope="session")
def cifar10_betons(tmp_path_factory, cifar10_arrays):
    """(train.beton, test.beton) built by the CLI from CIFAR-10 pickles."""
    from ccfs_fast.cli import main

    root = tmp_path_factory.mktemp("cifar10")
    write_cifar10(root, *cifar10_arrays)
    out = root / "betons"
    assert main(["build", "cifar10", "--src", str(root), "--out", str(out), "--workers", "2"]) == 0
    return out / "cifar10_train.beton", out / "cifar10_test.beton"


def read_all(beton_path, rows=None):
    """Everything in a .beton through the FFCV row iterator: images [n,h,w,3], labels, index."""
    from ccfs_fast.data import BetonFile, iterate_rows

    beton = BetonFile.open(beton_path)
    rows = np.arange(beton.n) if rows is None else rows
    parts = list(iterate_rows(beton, rows, 256, 2))
    return tuple(torch.cat([p[k] for p in parts]).numpy() for k in range(3))
