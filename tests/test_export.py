"""What a researcher takes away: `ccfs-fast export` (the run's final set as an image folder, a .beton and
manifest.csv: round trips, refusals, atomic writes), selection.png and report.png, and per-epoch curves
(curves.csv always, TensorBoard with --tensorboard; a resumed run never duplicates an epoch)."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import inputs_of, one_line_error, read_all, run_args
from PIL import Image

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main


def _run_set(run) -> tuple[np.ndarray, np.ndarray]:
    """The run's final training set in its order, read from the inputs it names: (pixels, labels)."""
    state = json.loads((run / "state.json").read_text())
    settings = state["settings"]
    cpc = int(settings["image_per_class"] * settings["alpha"] + 1e-9)
    d_pixels, d_labels, _ = read_all(settings["distilled"])
    rows = np.concatenate([np.flatnonzero(d_labels == c)[:cpc] for c in range(int(d_labels.max()) + 1)])
    selected = np.asarray(state["selected"], np.int64)
    p_pixels, p_labels, _ = read_all(settings["pool"], selected)
    return np.concatenate([d_pixels[rows], p_pixels]), np.concatenate([d_labels[rows], p_labels])


def test_export_round_trips_a_raw_run(finished_run, tmp_path, capsys):
    """The exported .beton is the run's training set bit for bit, in the run's order, and training on it
    (`eval --train-set`) gives `eval --run-dir`'s accuracies; `build folder` of the exported folder gives
    the same images in the run's order within each class; manifest.csv says where each came from."""
    out = tmp_path / "export"
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    pixels, labels = _run_set(finished_run)
    beton_pixels, beton_labels, _ = read_all(out / "ccfs_set.beton")
    assert np.array_equal(beton_pixels, pixels) and np.array_equal(beton_labels, labels)
    pool_names = BetonFile.open(json.loads((finished_run / "state.json").read_text())["settings"]["pool"]) \
        .manifest.class_names
    assert BetonFile.open(out / "ccfs_set.beton").manifest.class_names == pool_names
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"{c:03d}" for c in range(len(pool_names))]
    with open(out / "classes.csv", newline="") as fh:  # the folders by label index, their names beside
        assert [(r["folder"], int(r["label"]), r["class_name"]) for r in csv.DictReader(fh)] == \
            [(f"{c:03d}", c, name) for c, name in enumerate(pool_names)]
    assert main(["build", "folder", "--src", str(out), "--out", str(tmp_path / "folder.beton")]) == 0
    by_class = np.argsort(labels, kind="stable")  # ImageFolder order: class, then file name (= the set's order)
    folder_pixels, folder_labels, _ = read_all(tmp_path / "folder.beton")
    assert np.array_equal(folder_pixels, pixels[by_class]) and np.array_equal(folder_labels, labels[by_class])
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    state = json.loads((finished_run / "state.json").read_text())
    scores = np.load(state["settings"]["score_path"])
    real = [r for r in rows if r["source"] == "pool"]
    assert [int(r["pool_index"]) for r in real] == state["selected"]
    assert [int(r["curriculum"]) for r in real] == list(np.repeat([1, 2, 3], [p["selected"] for p in state["phases"]]))
    assert all(float(r["score"]) == scores[int(r["pool_index"])] for r in real)
    assert all((out / r["file"]).is_file() and r["file"].endswith(".png") for r in rows)
    assert {r["source"] for r in rows[:len(rows) - len(real)]} == {"distilled"}
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(finished_run), "--output", str(tmp_path / "run_eval.json")]) == 0
    assert main(["eval", "--run-dir", str(finished_run), "--train-set", str(out / "ccfs_set.beton")]) == 0
    again = json.loads((out / "ccfs_set.eval.json").read_text())
    assert again["accs"] == json.loads((tmp_path / "run_eval.json").read_text())["accs"]
    assert not (finished_run / "ccfs_set.eval.json").exists()


def test_export_refusals_and_a_full_disk(finished_run, tmp_path, capsys):
    """An unfinished run is refused unless --allow-incomplete; an existing --out unless --overwrite; a disk
    that fills mid-export leaves neither the output nor its temporary folder."""
    run = tmp_path / "unfinished"
    shutil.copytree(finished_run, run)
    selection = json.loads((run / "selected_indices.json").read_text())
    (run / "selected_indices.json").write_text(json.dumps({**selection, "complete": False, "phases_done": 2}))
    assert main(["export", str(run), "--out", str(tmp_path / "e1")]) == 2
    one_line_error(capsys.readouterr().err, "unfinished run (2 curricula done)", "--allow-incomplete")
    assert not (tmp_path / "e1").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "e1"), "--allow-incomplete", "--format", "folder"]) == 0
    assert not (tmp_path / "e1" / "ccfs_set.beton").exists() and (tmp_path / "e1" / "manifest.csv").is_file()
    assert main(["export", str(finished_run), "--out", str(tmp_path / "e1")]) == 2
    one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert main(["export", str(finished_run), "--out", str(tmp_path / "e1"), "--overwrite", "--format", "beton"]) == 0
    assert (tmp_path / "e1" / "ccfs_set.beton").is_file() and not any(p.is_dir() for p in (tmp_path / "e1").iterdir())
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)]).returncode:
        pytest.skip("mounting a small file system needs root")
    try:
        capsys.readouterr()
        assert main(["export", str(finished_run), "--out", str(small / "e")]) == 2
        line = one_line_error(capsys.readouterr().err, "No space left on device", "free some space")
        assert f"cannot write {small / 'e'}:" in line and ".tmp-" not in line and "--resume" not in line
        assert list(small.iterdir()) == []  # no output, no temporary folder
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_curves_and_tensorboard_hold_what_training_returned(engine_data, tmp_path):
    """One row per epoch per model of a training, holding the values the training returned; the
    TensorBoard runs (one per model) read back, through tensorboard's own event reader, to the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ccfs_fast.runs.curves import CurveLog, read_curves
    from ccfs_fast.runs.workspace import open_workspace
    from ccfs_fast.train.loop import last_fifth_epochs
    from ccfs_fast.train.recipe import TrainRecipe
    from ccfs_fast.train.students import train_together

    ws = open_workspace(inputs_of(engine_data), 4)
    ws.curves = CurveLog(tmp_path / "curves.csv", tmp_path / "tb")
    recipe = TrainRecipe(epochs=3, lr=0.05, lr_warmup_epochs=1)
    out = train_together(ws, ws.distilled_rows, "convnet_tiny", recipe, 4.0, [1, 2], last_fifth_epochs(3),
                         "final evaluation", layout="bank_nchw", curve="final evaluation")
    ws.curves.close()
    teacher = read_curves(engine_data["teacher"].with_suffix(".curves.csv"))  # `ccfs-fast teacher` writes its own
    assert [(r["training"], int(r["epoch"])) for r in teacher] == [("teacher", e) for e in range(6)]
    assert all(float(r["loss"]) > 0 for r in teacher) and teacher[-1]["test_acc"]
    rows = read_curves(tmp_path / "curves.csv")
    assert len(rows) == 3 * 2 and {r["training"] for r in rows} == {"final evaluation"}
    for m, result in enumerate(out.results):
        mine = [r for r in rows if r["model"] == str(m + 1)]
        assert [int(r["epoch"]) for r in mine] == [0, 1, 2]
        assert [float(r["loss"]) for r in mine] == [e["loss"] for e in result.epochs]
        assert [float(r["lr"]) for r in mine] == [e["lr"] for e in result.epochs]
        tested = [(int(r["epoch"]), float(r["test_acc"])) for r in mine if r["test_acc"]]
        assert tested == result.accs
        events = EventAccumulator(str(tmp_path / "tb" / f"final_evaluation_model_{m + 1}"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("loss")] == \
            [(e["epoch"], pytest.approx(e["loss"], rel=1e-6)) for e in result.epochs]
        assert [(e.step, e.value) for e in events.Scalars("test_acc")] == \
            [(epoch, pytest.approx(acc, rel=1e-6)) for epoch, acc in result.accs]


def test_a_resumed_run_appends_its_curves_without_duplicates(engine_data, tmp_path):
    """A run stopped during curriculum 3 (its filter's curve already written) and resumed: curves.csv
    holds every epoch of every training once, the redone filter's included; the run's per-epoch
    TensorBoard runs likewise."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(run_args(engine_data, run, "--tensorboard")) == 0
    complete = {(r["training"], r["model"], r["epoch"]) for r in csv.DictReader(open(run / "curves.csv"))}
    state = json.loads((run / "state.json").read_text())
    kept = state["phases"][:2]
    state.update(phases=kept, selected=state["selected"][:sum(p["selected"] for p in kept)], final=None)
    (run / "state.json").write_text(json.dumps(state))
    (run / "phase3_candidates.npz").unlink()
    with open(run / "curves.csv") as fh:  # the crash came after the final evaluation's first epoch
        lines = [ln for ln in fh if not ln.startswith("final evaluation") or ",0," in ln]
    (run / "curves.csv").write_text("".join(lines))
    assert main(run_args(engine_data, run, "--resume", "--tensorboard")) == 0
    rows = [(r["training"], r["model"], r["epoch"]) for r in csv.DictReader(open(run / "curves.csv"))]
    assert len(rows) == len(set(rows)) and set(rows) == complete
    runs = sorted(p.name for p in (run / "tb").iterdir())
    assert runs == ["filter_1", "filter_2", "filter_3", "final_evaluation_model_1", "final_evaluation_model_2"]
    for name in runs:  # the redone trainings' event files were replaced, not appended to
        events = EventAccumulator(str(run / "tb" / name))
        events.Reload()
        assert [e.step for e in events.Scalars("loss")] == [0, 1, 2], name


def test_selection_figure_and_report_on_a_cifar_format_run(finished_run, tmp_path, capsys):
    """report writes selection.png (distilled images, then each curriculum's picks per class) and the
    report; --classes picks classes by name or label and refuses unknown ones in one line."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    for name in ("report.png", "selection.png"):
        (run / name).unlink(missing_ok=True)
    assert main(["report", str(run), "--classes", "class3", "1"]) == 0
    with Image.open(run / "selection.png") as png:
        assert png.size[0] > 500 and 150 < png.size[1] < 400  # two rows of thumbnails
    with Image.open(run / "report.png") as png:
        assert png.size == (2200, 1100)
    capsys.readouterr()
    assert main(["report", str(run), "--classes", "zebra"]) == 2
    one_line_error(capsys.readouterr().err, "--classes zebra: no such class", "class0")
