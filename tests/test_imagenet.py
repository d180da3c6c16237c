"""ImageNet-1K: `build imagenet` on generated ILSVRC-2012 trees, JPEG pools of varying image size in
the engine, scores keyed by file name, torchvision weights files as teachers, a whole run on CPU."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import check_snapshot
from formats import IMAGENET_WNIDS, write_ilsvrc, write_image_folder
from PIL import Image

from beton_builder.base.errors import BuildError, ScoreError
from beton_builder.beton import BetonFile
from beton_builder.imagenet import read_imagenet
from beton_builder.manifest import read_manifest, recorded_names
from ccfs_fast.cli import main
from ccfs_fast.data.augment import crop_boxes_from, crop_boxes_sized, draw_augmentation
from ccfs_fast.data.readers import read_labels
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.selection.scores import load_scores

SIDE = 32  # the train side of the CPU tests (ImageNet's is 224)


@pytest.fixture(scope="session")
def ilsvrc(tmp_path_factory):
    """An ILSVRC-2012 tree (4 classes x 16 train JPEGs of varying size, flat val labelled by
    LOC_val_solution.csv) built by the CLI into JPEG .beton files."""
    root = tmp_path_factory.mktemp("ilsvrc")
    info = write_ilsvrc(root / "src", IMAGENET_WNIDS, 16, 4, "loc")
    assert main(["build", "imagenet", "--src", str(root / "src"), "--out", str(root / "betons"),
                 "--max-side", "48", "--jpeg-quality", "95"]) == 0
    return {"root": root, "src": root / "src", "pool": root / "betons" / "imagenet_train.beton",
            "test": root / "betons" / "imagenet_test.beton", **info}


def test_train_order_is_torchvision_imagefolder_order(ilsvrc):
    """Canonical order = torchvision ImageFolder's (sorted wnids, sorted file names): the recorded file
    names and the .beton's labels follow it row for row."""
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(ilsvrc["src"] / "train"))
    expected = [os.path.relpath(path, ilsvrc["src"] / "train") for path, _ in folder.samples]
    pool = BetonFile.open(ilsvrc["pool"])
    assert recorded_names(ilsvrc["pool"]).tolist() == expected
    assert read_labels(pool).tolist() == folder.targets
    assert pool.manifest.class_names == tuple(folder.classes)
    assert pool.manifest.variable_size and pool.manifest.dataset == "imagenet" and pool.manifest.jpeg_quality == 95


def test_stored_images_are_the_source_images(ilsvrc):
    """Each row decodes (centre crop of 7/8 the short side, at SIDE) to its source file's crop within
    JPEG re-encoding error; sizes are the sources' shrunk to --max-side 48 (FFCV's resizer); grayscale
    and CMYK sources come back as RGB."""
    import cv2
    from ffcv.fields.rgb_image import resizer

    pool = BetonFile.open(ilsvrc["pool"])
    images = IndexSpace(pool, side=SIDE).read_resident(np.arange(pool.n), torch.device("cpu"), 2, "eval")[0]
    names = recorded_names(ilsvrc["pool"])
    for row in range(pool.n):
        with Image.open(ilsvrc["src"] / "train" / names[row]) as img:
            stored = resizer(np.asarray(img.convert("RGB")), 48)
        h, w = stored.shape[:2]
        assert tuple(pool.sizes[row]) == (h, w) and max(h, w) <= 48
        c = int(224 / 256 * min(h, w))
        top, left = (h - c) // 2, (w - c) // 2
        crop = cv2.resize(stored[top:top + c, left:left + c], (SIDE, SIDE), interpolation=cv2.INTER_AREA)
        diff = np.abs(images[row].permute(1, 2, 0).numpy().astype(int) - crop.astype(int))
        assert diff.mean() < 3, (row, diff.mean())
    wnid = IMAGENET_WNIDS[0]
    gray = images[names.tolist().index(f"{wnid}/{wnid}_7919.JPEG")].float()  # k == 1 was saved as grayscale
    assert (gray[0] - gray[1]).abs().max() <= 2 and (gray[1] - gray[2]).abs().max() <= 2


@pytest.mark.parametrize("layout", ["loc", "devkit", "folders"])
def test_val_labels_in_each_published_layout(tmp_path, layout):
    """Flat val with LOC_val_solution.csv, flat val with the devkit's ground truth through meta.mat
    (ids not in sorted-wnid order), or val sorted into wnid folders: every image gets its wnid's
    class index (sorted wnids, as train)."""
    info = write_ilsvrc(tmp_path, IMAGENET_WNIDS, 2, 3, layout)
    test = read_imagenet(tmp_path)["test"]
    got = [test.class_names[label] for label in test.labels]
    assert got == (sorted(info["val_wnids"]) if layout == "folders" else info["val_wnids"])
    assert test.class_names == tuple(IMAGENET_WNIDS)


def test_val_without_labels_or_with_missing_ones_is_a_clear_error(tmp_path):
    write_ilsvrc(tmp_path, IMAGENET_WNIDS, 2, 2, "loc")
    csv = tmp_path / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(BuildError, match="no label for 2 val images"):
        read_imagenet(tmp_path)
    csv.unlink()
    with pytest.raises(BuildError, match="LOC_val_solution.csv"):
        read_imagenet(tmp_path)


def _encoder_child(src: str, out: str) -> str:
    """A child process that builds `out` from src's train list repeated 16 times (so it is still
    writing when killed), with 4 KiB pages and a progress record after every page."""
    return f"""
import dataclasses, sys
from pathlib import Path
from beton_builder.imagenet import read_imagenet
from beton_builder.jpeg_writer import JpegSettings, write_jpeg_beton
files = read_imagenet(Path({src!r}))["train"]
np = __import__("numpy")
files = dataclasses.replace(files, paths=files.paths * 16, names=files.names * 16, labels=np.tile(files.labels, 16),
                            stamps=np.tile(files.stamps, (16, 1)))
write_jpeg_beton(files, Path(sys.argv[1]), JpegSettings(48, 90), 1, page_size=4096, checkpoint_s=0)
"""


def test_an_interrupted_build_resumes_and_gives_the_same_file(ilsvrc, tmp_path):
    """kill -9 during a build, then the same build again: it resumes from its progress record (says
    so) and the result is byte for byte the file an uninterrupted build writes."""
    script = _encoder_child(str(ilsvrc["src"]), "")
    killed, clean = tmp_path / "killed.beton", tmp_path / "clean.beton"
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], stderr=subprocess.DEVNULL)
    record = Path(f"{killed}.partial.npz")
    deadline = time.monotonic() + 120
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert record.exists() and not killed.exists(), "the build finished before it could be interrupted"
    resumed = subprocess.run([sys.executable, "-c", script, str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "images were already written" in resumed.stderr
    subprocess.run([sys.executable, "-c", script, str(clean)], check=True, capture_output=True)
    assert killed.read_bytes() == clean.read_bytes()
    assert not record.exists() and not Path(f"{killed}.partial").exists()
    assert read_labels(BetonFile.open(killed)).tolist() == np.tile(read_labels(BetonFile.open(ilsvrc["pool"])),
                                                                   16).tolist()


def test_a_finished_build_is_kept_and_other_settings_are_refused(ilsvrc, capsys):
    out = ilsvrc["pool"].parent
    before = ilsvrc["pool"].stat().st_mtime_ns
    assert main(["build", "imagenet", "--src", str(ilsvrc["src"]), "--out", str(out), "--max-side", "48",
                 "--jpeg-quality", "95"]) == 0
    assert "already built from the same files and settings; kept" in capsys.readouterr().err
    assert ilsvrc["pool"].stat().st_mtime_ns == before
    assert main(["build", "imagenet", "--src", str(ilsvrc["src"]), "--out", str(out), "--max-side", "40"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    changed = next((ilsvrc["src"] / "train" / IMAGENET_WNIDS[2]).iterdir())  # a source file rewritten since
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert main(["build", "imagenet", "--src", str(ilsvrc["src"]), "--out", str(out), "--max-side", "48",
                     "--jpeg-quality", "95"]) == 2
        assert "already exists; pass --overwrite" in capsys.readouterr().err
    finally:
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _cscores(names: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores in pool order and a shuffled permutation of the rows."""
    rng = np.random.default_rng(seed)
    return rng.random(len(names)), rng.permutation(len(names))


def test_scores_keyed_by_file_name_align_to_the_pool(ilsvrc, tmp_path):
    """A c-score file (filenames as bytes of the base name, labels, scores) and a memorization file
    (tr_filenames, tr_labels, tr_mem), rows shuffled and with extra files, give the pool-order scores;
    a pool image without a score is an error with the count; wrong labels are refused."""
    names, labels = recorded_names(ilsvrc["pool"]), read_labels(BetonFile.open(ilsvrc["pool"]))
    scores, perm = _cscores(names, labels, 0)
    base = np.array([n.split("/")[-1].encode() for n in names])
    extra = np.array([b"n09999999_1.JPEG"])
    cs = tmp_path / "cscores.npz"
    np.savez(cs, filenames=np.concatenate([base[perm], extra]), labels=np.concatenate([labels[perm], [0]]),
             scores=np.concatenate([scores[perm], [0.5]]))
    mem = tmp_path / "mem.npz"
    np.savez(mem, tr_filenames=base[perm], tr_labels=labels[perm], tr_mem=scores[perm])
    pool_names = lambda: recorded_names(ilsvrc["pool"])  # noqa: E731
    notes: list[str] = []
    assert np.array_equal(load_scores(cs, labels, notes, pool_names), scores)
    assert "1 other scores are not used" in notes[0]
    assert np.array_equal(load_scores(mem, labels, None, pool_names), scores)
    short = tmp_path / "short.npz"
    np.savez(short, filenames=base[perm][3:], labels=labels[perm][3:], scores=scores[perm][3:])
    with pytest.raises(ScoreError, match=r"no score for 3 of the pool's 64 images"):
        load_scores(short, labels, None, pool_names)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, filenames=base, labels=(labels + 1) % 4, scores=scores)
    with pytest.raises(ScoreError, match="labels differ from the pool's"):
        load_scores(wrong, labels, None, pool_names)
    with pytest.raises(ScoreError, match="records no file names"):
        load_scores(cs, labels, None, lambda: None)


def test_crop_boxes_of_stored_sizes():
    """Square images: exactly the square-image boxes. Wide images: torchvision's RandomResizedCrop
    distribution on the image itself (mean crop height and width, how often its fallback is taken)."""
    from torchvision.transforms import RandomResizedCrop

    g = torch.Generator().manual_seed(0)
    u = draw_augmentation(4000, g, torch.float64)
    assert torch.equal(crop_boxes_from(u, 32), crop_boxes_sized(u, torch.full((4000, 2), 32.0), 32))
    height, width, side, n = 60, 200, 50, 40000
    boxes = crop_boxes_sized(draw_augmentation(n, g, torch.float64), torch.tensor([[height, width]] * n), side)
    h, w = boxes[:, 2] * height / side, boxes[:, 3] * width / side
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= side + 1e-9).all() \
        and (boxes[:, 1] + boxes[:, 3] <= side + 1e-9).all()
    torch.manual_seed(1)
    image = Image.new("RGB", (width, height))
    ref = torch.tensor([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
                       dtype=torch.float64)
    for ours, theirs in ((h, ref[:, 2]), (w, ref[:, 3])):
        assert abs(ours.mean() - theirs.mean()) < 4 * math.sqrt(2 * theirs.var() / n)
    fallback = lambda hh, ww: ((hh == height) & (ww == round(height * 4 / 3))).double().mean()  # noqa: E731
    assert abs(fallback(h, w) - fallback(ref[:, 2], ref[:, 3])) < 0.01


def test_a_torchvision_weights_file_is_a_teacher(tmp_path):
    """`resnet18-<hash>.pth` holding a plain state dict loads as torchvision's unmodified resnet18."""
    import torchvision

    from ccfs_fast.runs.workspace import resolve_teacher_arch
    from ccfs_fast.train.models import read_checkpoint

    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    assert resolve_teacher_arch(None, read_checkpoint(path)) == "torchvision:resnet18"
    other = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), other)
    assert resolve_teacher_arch(None, read_checkpoint(other)) == "resnet18"  # no torchvision name: the default


@pytest.fixture(scope="session")
def imagenet_run_inputs(ilsvrc):
    """A CDA-style distilled folder (new000.., class{c:03d}_id{k:03d}.jpg, 32x32), a teacher trained
    by `ccfs-fast teacher` on the JPEG pool and saved as a torchvision weights file, and a shuffled
    c-score file keyed by file name (plus the same scores in pool order)."""
    from formats import class_images

    root = ilsvrc["root"]
    x, _ = class_images(12, 4, 32, seed=7, separation=40)
    write_image_folder(root / "distilled", x, np.repeat(np.arange(4), 3), [f"new{c:03d}" for c in range(4)])
    assert main(["build", "folder", "--src", str(root / "distilled"), "--out", str(root / "distilled.beton")]) == 0
    assert main(["teacher", "--pool", str(ilsvrc["pool"]), "--test", str(ilsvrc["test"]), "--model",
                 "torchvision:resnet18", "--train-side", str(SIDE), "--epochs", "4", "--lr", "0.05",
                 "--output", str(root / "teacher.pt")]) == 0
    state = torch.load(root / "teacher.pt", weights_only=True)["model"]
    torch.save(state, root / "resnet18-5c3a9e1f.pth")  # a torchvision weights file: a plain state dict
    names, labels = recorded_names(ilsvrc["pool"]), read_labels(BetonFile.open(ilsvrc["pool"]))
    scores, perm = _cscores(names, labels, 3)
    np.savez(root / "cscores.npz", filenames=np.array([n.split("/")[-1].encode() for n in names])[perm],
             labels=labels[perm], scores=scores[perm])
    np.save(root / "cscores_pool_order.npy", scores)
    return {"distilled": root / "distilled.beton", "teacher": root / "resnet18-5c3a9e1f.pth",
            "scores": root / "cscores.npz", "scores_in_order": root / "cscores_pool_order.npy"}


def _imagenet_run(ilsvrc, inputs, out, *extra: str) -> list[str]:
    return ["run", "--preset", "imagenet-ipc10", "--smoke", "--pool", str(ilsvrc["pool"]), "--test",
            str(ilsvrc["test"]), "--distilled", str(inputs["distilled"]), "--teacher", str(inputs["teacher"]),
            "--train-side", str(SIDE), "--image-per-class", "10", "--curriculum-num", "2", "--device", "cpu",
            "--output-dir", str(out), *extra]


def test_a_whole_imagenet_run_on_cpu(ilsvrc, imagenet_run_inputs, tmp_path, capsys, monkeypatch):
    """`run --preset imagenet-ipc10 --smoke` on the JPEG pool with a torchvision weights file and a
    shuffled c-score file keyed by file name: it finishes, its train sets were resident (recorded per
    phase), and it selects exactly what the same scores in pool order select; a streamed run records
    that its train sets streamed."""
    from ccfs_fast.runs import teacher_pass

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(teacher_pass, "PROBE", 8)  # of the 64-image pool: the curricula's gate does the rest
    out = tmp_path / "run"
    assert main(_imagenet_run(ilsvrc, imagenet_run_inputs, out, "--score-path",
                              str(imagenet_run_inputs["scores"]))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["train_side"] == SIDE and metrics["settings"]["filter_model"] == "convnet_tiny"
    normalize = json.loads((out / "state.json").read_text())["normalize"]
    assert (normalize["mean"], normalize["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # torchvision's
    assert all(p["execution"]["train_data"].startswith("resident (") for p in metrics["phases"])
    assert "phase 1 filter: train set resident (" in capsys.readouterr().err  # the choice, printed
    selected = json.loads((out / "selected_indices.json").read_text())
    assert len(selected["idx_selected"]) > 0
    check_snapshot("imagenet_run", out)  # bit for bit what it selected before the engine's restructuring
    in_order = tmp_path / "in_order"  # and the teacher predicting every pool image first: the same selection
    assert main(_imagenet_run(ilsvrc, imagenet_run_inputs, in_order, "--score-path",
                              str(imagenet_run_inputs["scores_in_order"]), "--num-eval", "0",
                              "--teacher-pass", "full")) == 0
    again = json.loads((in_order / "selected_indices.json").read_text())
    assert again["idx_selected"] == selected["idx_selected"]
    assert metrics["totals"]["teacher_pass"] == "lazy" and metrics["phases"][0]["teacher_predicted"] > 0
    assert json.loads((in_order / "metrics.json").read_text())["totals"]["teacher_predicted"] == 64
    streamed = tmp_path / "streamed"
    assert main(_imagenet_run(ilsvrc, imagenet_run_inputs, streamed, "--score-path",
                              str(imagenet_run_inputs["scores"]), "--train-data", "streamed",
                              "--curriculum-num", "1", "--num-eval", "1")) == 0
    phases = json.loads((streamed / "metrics.json").read_text())["phases"]
    assert phases[0]["execution"]["train_data"].startswith("streamed (--train-data")
    assert read_manifest(ilsvrc["pool"]).n == 64


def test_jpeg_pool_export_keeps_the_stored_jpeg_bytes(ilsvrc, imagenet_run_inputs, tmp_path):
    """An ImageNet-format run (JPEG pool): the exported files of pool images are the stored JPEG bytes
    (no re-encoding), and so are the exported .beton's rows."""
    from ccfs_fast.data.readers import stored_bytes

    inputs = imagenet_run_inputs
    run = tmp_path / "run"
    assert main(_imagenet_run(ilsvrc, inputs, run, "--score-path", str(inputs["scores"]), "--num-eval", "1")) == 0
    assert (run / "selection.png").is_file() and (run / "report.png").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 0
    with open(tmp_path / "e" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    real = [r for r in rows if r["source"] == "pool"]
    pool = BetonFile.open(ilsvrc["pool"])
    stored = list(stored_bytes(pool, [int(r["pool_index"]) for r in real]))
    assert [(tmp_path / "e" / r["file"]).read_bytes() for r in real] == stored
    assert all(r["file"].endswith(".jpg") and r["file"].split("/")[0] == f"{int(r['label']):03d}" for r in real)
    assert all(r["class_name"].startswith("n0") for r in real)
    exported = BetonFile.open(tmp_path / "e" / "ccfs_set.beton")
    assert list(stored_bytes(exported, np.arange(len(rows) - len(real), len(rows)))) == stored
    assert read_labels(exported).tolist() == [int(r["label"]) for r in rows]


def test_a_distilled_folder_with_one_wrong_wnid_is_refused(ilsvrc, imagenet_run_inputs, tmp_path):
    """An RDED-style distilled folder of wnids with one wnid that is not the pool's: a real `run`
    process exits 2 with one line naming the differences (every class after it would take another
    class's label); the same folder with the right wnids runs."""
    from formats import class_images

    x, _ = class_images(12, 4, 32, seed=7, separation=40)
    wrong = [*IMAGENET_WNIDS[:1], "n09999999", *IMAGENET_WNIDS[2:]]  # sorts last: labels 1-3 would shift
    labels = np.repeat(np.arange(4), 3)
    for name, wnids in (("wrong", wrong), ("right", IMAGENET_WNIDS)):
        write_image_folder(tmp_path / name, x, labels, wnids)
        assert main(["build", "folder", "--src", str(tmp_path / name), "--out", str(tmp_path / f"{name}.beton")]) == 0
    inputs = {**imagenet_run_inputs, "distilled": tmp_path / "wrong.beton"}
    done = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", *_imagenet_run(ilsvrc, inputs, tmp_path / "run",
                           "--score-path", str(inputs["scores"]), "--num-eval", "0")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ccfs-fast: error:")]
    assert len(errors) == 1 and "names its classes differently from the pool at 3 of 4 labels" in errors[0]
    assert "'n01443537' have no folder" not in errors[0] and "'n01443537'" in errors[0]
    inputs["distilled"] = tmp_path / "right.beton"
    assert main(_imagenet_run(ilsvrc, inputs, tmp_path / "run2", "--score-path", str(inputs["scores"]),
                              "--num-eval", "0", "--curriculum-num", "1")) == 0
