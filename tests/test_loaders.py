"""Index-subset FFCV loaders: exact indices, once per epoch, pool + distilled in one index space."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from formats import class_images

from beton_builder.arrays import read_arrays
from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from beton_builder.writer import write_beton
from ccfs_fast.data.augment import crop_resize_flip, sample_crop_boxes
from ccfs_fast.data.loaders import EvalLoader, ResidentTrainLoader, make_test_loader
from ccfs_fast.data.space import IndexSpace


@pytest.fixture(scope="module")
def space(tmp_path_factory, cifar10_betons):
    """The CIFAR pool plus a 40-image distilled set (4 per class) in one index space."""
    root = tmp_path_factory.mktemp("distilled")
    x, y = class_images(40, 10, 32, seed=9)
    np.savez(root / "d.npz", x=x, y=y)
    write_beton(read_arrays(root / "d.npz"), root / "d.beton")
    return IndexSpace(BetonFile.open(cifar10_betons[0]), BetonFile.open(root / "d.beton")), x, y


def _pool_arrays(cifar10_arrays):
    return cifar10_arrays[0]


def test_eval_loader_yields_requested_indices_once(space, cifar10_arrays):
    sp, dx, dy = space
    px, py = _pool_arrays(cifar10_arrays)
    rng = np.random.default_rng(0)
    wanted = np.concatenate([rng.choice(sp.n_pool, 77, replace=False), sp.n_pool + np.array([3, 0, 39])])
    loader = EvalLoader(sp, wanted, batch_size=16, device="cpu")
    images, labels, index = (torch.cat(t) for t in zip(*loader))
    assert sorted(index.tolist()) == sorted(wanted.tolist())
    assert len(index) == len(wanted) == 80  # drop_last=False: the last short batch is kept
    assert len(loader) == -(-77 // 16) + 1
    all_x = np.concatenate([px, dx])
    all_y = np.concatenate([py, dy])
    np.testing.assert_array_equal(labels.numpy(), all_y[index.numpy()])
    mean = np.array(sp.manifest.mean) * 255
    std = np.array(sp.manifest.std) * 255
    expect = (all_x[index.numpy()].astype(np.float32) - mean) / std
    np.testing.assert_allclose(images.numpy(), expect.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_pool_order_preserved_within_file(space):
    sp, _, _ = space
    wanted = np.array([500, 2, 311, 2 + 0, 7])[[0, 1, 2, 4]]
    index = torch.cat([b[2] for b in EvalLoader(sp, wanted, 2, "cpu")])
    assert index.tolist() == wanted.tolist()


def test_train_loader_covers_union_once_per_epoch(space, cifar10_arrays):
    sp, dx, dy = space
    selected = np.array([5, 17, 250, 599, 42])
    train_set = np.concatenate([sp.distilled_indices(), selected])
    loader = ResidentTrainLoader(sp, train_set, batch_size=8, device="cpu", seed=3)
    orders = []
    for _ in range(3):
        batches = list(loader)
        index = torch.cat([b[2] for b in batches])
        assert sorted(index.tolist()) == sorted(train_set.tolist())  # each once per epoch
        assert all(b[0].shape[1:] == (3, 32, 32) and b[0].dtype == torch.float32 for b in batches)
        labels = torch.cat([b[1] for b in batches]).numpy()
        all_y = np.concatenate([cifar10_arrays[0][1], dy])
        np.testing.assert_array_equal(labels, all_y[index.numpy()])
        orders.append(index.tolist())
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert len(loader) == -(-len(train_set) // 8)
    # Distilled and selected rows are shuffled together, not one block after the other.
    first_half = set(orders[0][: len(train_set) // 2])
    assert first_half & set(selected.tolist()) and first_half & set(sp.distilled_indices().tolist())


def test_train_loader_deterministic_per_seed(space):
    sp, _, _ = space
    idx = np.arange(0, 600, 7)
    a = [b[0] for b in ResidentTrainLoader(sp, idx, 16, "cpu", seed=1)]
    b = [b[0] for b in ResidentTrainLoader(sp, idx, 16, "cpu", seed=1)]
    c = [b[0] for b in ResidentTrainLoader(sp, idx, 16, "cpu", seed=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_train_loader_shards_partition_epoch(space):
    sp, _, _ = space
    idx = np.arange(0, 101)
    shards = [ResidentTrainLoader(sp, idx, 10, "cpu", seed=4, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([b[2] for b in s]).tolist() for s in shards]
    assert len({len(s) for s in seen}) == 1 and sorted(set(sum(seen, []))) == idx.tolist()


def test_crop_boxes_follow_torchvision_bounds():
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(20000, 32, g)
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (h <= 32).all() and (w <= 32).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w / 1024).numpy()
    assert 0.05 < area.min() < 0.12 and area.max() > 0.95 and 0.45 < np.median(area) < 0.6
    ratio = (w / h).numpy()
    assert np.quantile(ratio, 0.02) > 0.6 and np.quantile(ratio, 0.98) < 1.6


def test_crop_resize_flip_identity_and_flip():
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    full = torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 4)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    same = crop_resize_flip(x, full, torch.zeros(4, dtype=torch.bool), 16, zero, one)
    torch.testing.assert_close(same, x.float())
    flipped = crop_resize_flip(x, full, torch.ones(4, dtype=torch.bool), 16, zero, one)
    torch.testing.assert_close(flipped, x.float().flip(-1))
    # A 8x8 crop at (4, 2), upsampled x2: every output pixel lies in that window's value range.
    box = torch.tensor([[4.0, 2.0, 8.0, 8.0]] * 4)
    crop = crop_resize_flip(x, box, torch.zeros(4, dtype=torch.bool), 16, zero, one)
    window = x[:, :, 4:12, 2:10].float()
    assert (crop >= window.amin((2, 3), keepdim=True) - 1e-4).all()
    assert (crop <= window.amax((2, 3), keepdim=True) + 1e-4).all()
    torch.testing.assert_close(crop[:, :, 1::2, 1::2][:, :, :-1, :-1],
                               (window[:, :, :-1, :-1] * 0.75 + window[:, :, 1:, :-1] * 0.25) * 0.75
                               + (window[:, :, :-1, 1:] * 0.75 + window[:, :, 1:, 1:] * 0.25) * 0.25)


def test_test_loader_checks_classes(cifar10_betons, tmp_path):
    pool, test = BetonFile.open(cifar10_betons[0]), BetonFile.open(cifar10_betons[1])
    loader = make_test_loader(test, 10, IndexSpace(pool).norm, 64, "cpu")
    assert sum(len(b[1]) for b in loader) == test.n
    x, y = class_images(10, 3, 32, seed=1)
    np.savez(tmp_path / "t.npz", x=x, y=y)
    write_beton(read_arrays(tmp_path / "t.npz"), tmp_path / "t.beton")
    with pytest.raises(DataError, match="3 classes but the pool has 10"):
        make_test_loader(BetonFile.open(tmp_path / "t.beton"), 10, IndexSpace(pool).norm, 64, "cpu")


def test_distilled_side_mismatch(cifar10_betons, tmp_path):
    x, _ = class_images(10, 10, 16, seed=1)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10))
    write_beton(read_arrays(tmp_path / "d.npz"), tmp_path / "d.beton")
    with pytest.raises(DataError, match="--side 32"):
        IndexSpace(BetonFile.open(cifar10_betons[0]), BetonFile.open(tmp_path / "d.beton"))


def test_missing_manifest_and_corrupt_beton(cifar10_betons, tmp_path):
    copy = tmp_path / "c.beton"
    copy.write_bytes(cifar10_betons[0].read_bytes())
    with pytest.raises(DataError, match="manifest .* is missing"):
        BetonFile.open(copy)
    manifest = json.loads(open(f"{cifar10_betons[0]}.json").read())
    (tmp_path / "c.beton.json").write_text(json.dumps(manifest))
    copy.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="truncated: 100 of the .* bytes its manifest records .* rebuild"):
        BetonFile.open(copy)
    copy.write_bytes(cifar10_betons[0].read_bytes() + b"\0" * 100)  # longer: not a truncated copy
    with pytest.raises(DataError, match="bytes, but its manifest describes a .beton of .* different builds"):
        BetonFile.open(copy)
    data = bytearray(cifar10_betons[0].read_bytes())
    data[-5000] ^= 0xFF  # same size, one byte changed
    copy.write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its manifest's record .*the manifest is the stale one"):
        BetonFile.open(copy)
    del manifest["beton_size"], manifest["beton_sha256"]  # a manifest of builder version 2: FFCV's own check
    (tmp_path / "c.beton.json").write_text(json.dumps(manifest))
    copy.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="not a readable .beton"):
        BetonFile.open(copy)


def test_row_reader_retargets_one_compiled_loader(cifar10_betons, cifar10_arrays):
    from ccfs_fast.data.readers import RowReader

    reader = RowReader(BetonFile.open(cifar10_betons[0]), 64, 2)
    x, y = cifar10_arrays[0]
    for rows in (np.arange(0, 600, 3), np.array([599, 0, 17]), np.arange(130)):
        images, labels, index = (torch.cat(t) for t in zip(*reader.read(rows)))
        assert index.tolist() == rows.tolist()
        np.testing.assert_array_equal(images.numpy(), x[rows])
        np.testing.assert_array_equal(labels.numpy(), y[rows])
    loader = reader._loader
    list(reader.read(np.arange(5)))
    assert reader._loader is loader  # compiled once, reused


@pytest.fixture(scope="module")
def three_page_beton(tmp_path_factory):
    """A 32x32 .beton of 6,000 images: FFCV's 8 MiB pages hold about 2,700 of them, so 3 pages or more."""
    root = tmp_path_factory.mktemp("pages")
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 256, (6000, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 6000)
    np.savez(root / "p.npz", x=x, y=y)
    write_beton(read_arrays(root / "p.npz"), root / "p.beton")
    return BetonFile.open(root / "p.beton"), x, y


def test_scattered_rows_read_through_the_os_cache_give_the_same_batches(three_page_beton, monkeypatch):
    """Rows spread thinly over the file (a lazy coarse-pass round, scattered selected images) are read
    through the OS page cache instead of FFCV's whole-page process cache: the same images, labels and
    order either way; dense subsets keep the process cache."""
    import ccfs_fast.data.readers as data
    import ccfs_fast.data.space as space_module

    beton, x, y = three_page_beton
    assert beton.page_size == 8 << 20 and beton.row_bytes == 32 * 32 * 3
    assert len(np.unique(beton.page_of_row)) >= 3  # FFCV's writer workers may each start a page
    monkeypatch.setattr(data, "SCATTER_MIN_BYTES", 0)  # this file is small; the rule itself is tested
    sparse, dense = np.arange(7, 6000, 300), np.arange(1000, 4000)
    assert data.scattered_rows(beton, sparse) and not data.scattered_rows(beton, dense)
    space = IndexSpace(beton)
    batches = {}
    for os_cache in (False, True):
        monkeypatch.setattr(space_module, "scattered_rows", lambda b, r, os_cache=os_cache: os_cache)
        assert space.reader(beton, 64, 2, sparse).os_cache is os_cache
        images, labels, index = (torch.cat(t) for t in zip(*EvalLoader(space, sparse, 8, "cpu")))
        resident = space.read_resident(sparse, torch.device("cpu"), 2)
        batches[os_cache] = (images, labels, index, *resident)
        np.testing.assert_array_equal(index.numpy(), sparse)
        np.testing.assert_array_equal(labels.numpy(), y[sparse])
        np.testing.assert_array_equal(resident[0].permute(0, 2, 3, 1).numpy(), x[sparse])
    for a, b in zip(batches[False], batches[True]):
        assert torch.equal(a, b)


def test_warm_up_compiles_every_reader_a_phase_uses(three_page_beton, monkeypatch):
    """After IndexSpace.warm_readers, a phase's reads (scattered and dense evaluation, a resident
    train set of scattered pool rows) reuse compiled readers: none is created during the phase."""
    import ccfs_fast.data.readers as data

    beton, x, _ = three_page_beton
    monkeypatch.setattr(data, "SCATTER_MIN_BYTES", 0)  # this file is small; both cache kinds apply
    space = IndexSpace(beton)
    space.warm_readers(2)

    def readers() -> int:
        return sum(len(v) for k, v in data._READERS.items() if k[0] == str(beton.path.resolve()))

    made = readers()
    sparse, dense = np.arange(7, 6000, 300), np.arange(1000, 4000)
    assert data.scattered_rows(beton, sparse) and not data.scattered_rows(beton, dense)
    for rows in (sparse, dense):
        np.testing.assert_array_equal(torch.cat([b[2] for b in EvalLoader(space, rows, 256, "cpu")]).numpy(), rows)
        resident = space.read_resident(rows, torch.device("cpu"), 2)
        np.testing.assert_array_equal(resident[0].permute(0, 2, 3, 1).numpy(), x[rows])
    assert readers() == made  # nothing compiled during the "phase"
    warmed = {(k[4], k[7]) for k, v in data._READERS.items() if k[0] == str(beton.path.resolve()) and v}
    assert {(data.READ_CHUNK, False), (data.READ_CHUNK, True)} <= warmed  # one per cache kind


FFCV_IMPORT = """
import ccfs_fast.data.readers
import ffcv.fields.rgb_image as rgb_image
import numba.typed
from numba.typed import typeddict
assert type(rgb_image.IMAGE_MODES) is dict and rgb_image.IMAGE_MODES == {"jpg": 0, "raw": 1}
assert numba.typed.Dict is typeddict.Dict  # restored for everyone else
print("ok")
"""


def test_ffcv_is_imported_without_compiling_a_typed_dict():
    """In a fresh process, importing the project imports FFCV with IMAGE_MODES as a plain dict of the
    same two entries (its typed Dict's first insert compiled numba's dict, about 4.9 s of every
    process start) and numba's typed Dict restored. Raw and JPEG rows decode as before: the loader
    and JPEG-build tests read both modes."""
    done = subprocess.run([sys.executable, "-c", FFCV_IMPORT], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
