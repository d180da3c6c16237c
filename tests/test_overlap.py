"""A distilled set that is, or holds, pool images: the pool itself is refused; copies are counted."""
from __future__ import annotations

import json

import numpy as np
from conftest import run_args, set_flag
from formats import class_images, write_image_folder

from beton_builder.base.digests import row_digest_path
from beton_builder.beton import BetonFile
from ccfs_fast.cli import main
from ccfs_fast.data.overlap import distilled_overlap


def test_the_pool_as_distilled_set_is_refused(engine_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(set_flag(run_args(engine_data, out), "--distilled", str(engine_data["pool"]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccfs-fast: error: --distilled"), err
    assert "holds exactly the pool's images" in err[0] and "same content digest" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_distilled_copies_of_pool_images_are_counted(engine_data, tmp_path, capsys):
    """Three pool images copied (as PNG) into the distilled folder, first in their class folders:
    one warning line with the count 3 and their pool indices, recorded in metrics.json."""
    pool_x, pool_y = class_images(800, 10, 32, seed=1, separation=40)  # the engine pool, in pool order
    x, _ = class_images(60, 10, 32, seed=3, separation=40)
    labels = np.repeat(np.arange(10), 6)
    copied = [int(np.flatnonzero(pool_y == c)[0]) for c in range(3)]
    for c, index in enumerate(copied):
        x[c * 6] = pool_x[index]  # the first file of class c's folder
    write_image_folder(tmp_path / "distilled", x, labels, [f"c{i}" for i in range(10)])
    beton = tmp_path / "d.beton"
    assert main(["build", "folder", "--src", str(tmp_path / "distilled"), "--out", str(beton)]) == 0
    assert row_digest_path(beton).is_file()
    capsys.readouterr()
    out = tmp_path / "out"
    args = set_flag(run_args(engine_data, out, "--num-eval", "0", "--epochs", "1", "--lr-warmup-epochs", "0"),
                    "--distilled", str(beton))
    assert main(args) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "pixel-identical" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 3 of the 40 distilled images"), warnings
    assert f"pool indices {', '.join(map(str, copied))})" in warnings[0]
    overlap = json.loads((out / "metrics.json").read_text())["distilled_overlap"]
    assert overlap["images"] == 3 and overlap["pool_indices"] == copied and overlap["distilled_rows"] == [0, 6, 12]

    # Without the sidecars (a .beton built by an older version) the files are read instead: same count.
    row_digest_path(beton).unlink()
    row_digest_path(engine_data["pool"]).rename(tmp_path / "kept.npz")
    try:
        again = distilled_overlap(BetonFile.open(engine_data["pool"]), BetonFile.open(beton),
                                  np.arange(60).reshape(10, 6)[:, :4].ravel())
    finally:
        (tmp_path / "kept.npz").rename(row_digest_path(engine_data["pool"]))
    assert again == overlap


def test_a_stale_digest_sidecar_is_not_trusted(engine_data, tmp_path, capsys):
    """A sidecar made for another build of the file is reported and the file is read instead."""
    import shutil

    from beton_builder.base.files import write_npz

    beton = tmp_path / "d.beton"
    shutil.copy(engine_data["distilled"], beton)
    shutil.copy(f"{engine_data['distilled']}.json", f"{beton}.json")
    write_npz(row_digest_path(beton), digests=np.zeros(60, np.uint64), beton_sha256=np.array("0" * 64))
    result = distilled_overlap(BetonFile.open(engine_data["pool"]), BetonFile.open(beton), np.arange(40))
    assert result["images"] == 0
    err = capsys.readouterr().err
    assert "made for another build of the file" in err and str(row_digest_path(beton)) in err
