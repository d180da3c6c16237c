"""Nothing a command does destroys a user's files or answers from the wrong inputs: `export --overwrite`
replaces only an earlier export; `eval`, `export` and `report` reopen a run only from its own inputs
(found from anywhere, each checked against its recorded digest, relocatable with a flag); no input file
runs code; labels are integers in range; damaged files and non-finite numbers end in one line."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, fails_fast, one_line_error, run_args
from formats import class_images, write_cifar10, write_hub_parquet, write_tensor_pair

from ccfs_fast.cli import main

CLI = [sys.executable, "-m", "ccfs_fast.cli"]


class _Done:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def cli(monkeypatch, capsys):
    """`ccfs-fast ARGS` run from folder `cwd` (in this process: the tests' many commands would each pay
    a fresh interpreter's imports); its exit code and stderr."""
    def run(args: list[str], cwd: Path) -> _Done:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(args)
        return _Done(code, capsys.readouterr().err)
    return run


def _copy_beton(src: Path, dst: Path) -> None:
    """A .beton with its sidecars (manifest, row digests)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for path in src.parent.glob(src.name + "*"):
        shutil.copy2(path, dst.parent / (dst.name + path.name[len(src.name):]))


def _inputs_into(data: dict, folder: Path) -> None:
    for name, key in (("pool.beton", "pool"), ("test.beton", "test"), ("d.beton", "distilled")):
        _copy_beton(data[key], folder / name)
    shutil.copy2(data["teacher"], folder / "teacher.pt")
    shutil.copy2(data["scores"], folder / "forgetting.npy")


RELATIVE = {"pool": Path("data/pool.beton"), "test": Path("data/test.beton"), "distilled": Path("data/d.beton"),
            "teacher": Path("data/teacher.pt"), "scores": Path("data/forgetting.npy")}


@pytest.fixture(scope="module")
def relative_run(engine_data, tmp_path_factory):
    """A finished run started in `lab/` with relative paths (data/pool.beton, ...), and `elsewhere/`: a
    folder whose data/pool.beton is another pool (other images), beside copies of the other inputs."""
    root = tmp_path_factory.mktemp("relative")
    lab, elsewhere = root / "lab", root / "elsewhere"
    _inputs_into(engine_data, lab / "data")
    done = subprocess.run([*CLI, *run_args(RELATIVE, "runs/r1"), "--curriculum-num", "2", "--num-eval", "1"],
                          cwd=lab, capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    _inputs_into(engine_data, elsewhere / "data")
    write_cifar10(root / "other_src", class_images(800, 10, 32, seed=11, separation=40),
                  class_images(200, 10, 32, seed=12, separation=40))
    assert main(["build", "cifar10", "--src", str(root / "other_src"), "--out", str(root / "other")]) == 0
    _copy_beton(root / "other" / "cifar10_train.beton", elsewhere / "data" / "pool.beton")
    return {"root": root, "lab": lab, "run": lab / "runs" / "r1", "elsewhere": elsewhere}


def _export_pixels(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(out.rglob("*.png"))]


def test_a_run_answers_from_its_own_inputs_wherever_it_is_asked(relative_run, tmp_path, cli):
    """From a folder holding another pool at the same relative path, export / eval / report use the
    run's own inputs (found from its recorded start folder); a run state of an older version (no start
    folder) is refused there in one line naming the pool and --pool; with --pool pointing at the run's
    pool it works, at another pool it is refused."""
    run, lab, elsewhere = relative_run["run"], relative_run["lab"], relative_run["elsewhere"]
    here = cli(["export", str(run), "--out", str(tmp_path / "from_lab")], lab)
    there = cli(["export", str(run), "--out", str(tmp_path / "from_elsewhere")], elsewhere)
    assert here.returncode == 0 and there.returncode == 0, there.stderr[-2000:]
    assert _export_pixels(tmp_path / "from_lab") == _export_pixels(tmp_path / "from_elsewhere")
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    state = json.loads((old / "state.json").read_text())
    for key in ("start_dir", "inputs_from_run_dir"):
        state.pop(key)
    (old / "state.json").write_text(json.dumps(state))
    for args in (["export", str(old), "--out", str(tmp_path / "e")], ["eval", "--run-dir", str(old), "--num-eval", "1"],
                 ["report", str(old)]):
        done = cli(args, elsewhere)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        one_line_error(done.stderr, f"{elsewhere / 'data' / 'pool.beton'} is not the pool the run used", "--pool PATH")
    assert not (tmp_path / "e").exists() and not (old / "eval.json").exists()
    good = cli(["export", str(old), "--out", str(tmp_path / "e"), "--pool", str(lab / "data" / "pool.beton")],
                elsewhere)
    assert good.returncode == 0, good.stderr[-2000:]
    assert _export_pixels(tmp_path / "e") == _export_pixels(tmp_path / "from_lab")


def test_a_copied_run_finds_its_inputs_beside_it_and_a_changed_one_is_named(relative_run, tmp_path, cli):
    """A run copied to another place together with its inputs works from anywhere; an input replaced
    (the score file) or gone is named in one line with the flag that points at the right one."""
    moved = tmp_path / "moved"
    shutil.copytree(relative_run["lab"], moved)
    run = moved / "runs" / "r1"
    state = json.loads((run / "state.json").read_text())
    state["start_dir"] = str(tmp_path / "no_such_lab")  # the machine the run was made on
    (run / "state.json").write_text(json.dumps(state))
    done = cli(["export", str(run), "--out", str(tmp_path / "x1")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = np.load(moved / "data" / "forgetting.npy")
    np.save(moved / "data" / "forgetting.npy", scores[::-1].copy())
    done = cli(["export", str(run), "--out", str(tmp_path / "x2")], tmp_path)
    assert done.returncode == 2
    one_line_error(done.stderr, "is not the score file the run used", "--score-path PATH")
    (moved / "data" / "forgetting.npy").unlink()
    done = cli(["export", str(run), "--out", str(tmp_path / "x2")], tmp_path)
    one_line_error(done.stderr, "the run's score file data/forgetting.npy is not there", "--score-path PATH")
    assert done.returncode == 2 and not (tmp_path / "x2").exists()


def test_export_overwrite_replaces_only_an_earlier_export(finished_run, tmp_path, cli):
    """--overwrite into the run's parent, the current folder or a folder of someone's files is refused
    in one line and deletes nothing; an earlier export is replaced; a killed export's leftovers beside
    --out are removed by the next export there."""
    parent = tmp_path / "work"
    shutil.copytree(finished_run, parent / "run")
    (parent / "README.md").write_text("notes")
    run = parent / "run"
    cases = [(parent, f"holds the run being exported ({run.resolve()})", tmp_path),
             (Path("."), "is the current directory", parent)]
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\section{Intro}")
    cases.append((thesis, "holds 1 entries that no `ccfs-fast export` wrote (chapter1.tex)", tmp_path))
    for out, needle, cwd in cases:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        done = cli(["export", str(run), "--out", str(out), "--overwrite"], cwd)
        assert done.returncode == 2, done.stderr[-2000:]
        one_line_error(done.stderr, needle)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing deleted
    export = tmp_path / "set"
    assert cli(["export", str(run), "--out", str(export), "--format", "folder"], tmp_path).returncode == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f".set.tmp-{dead.pid}"
    left.mkdir()
    (left / ".ccfs-fast-export").write_text("{}")
    (left / "half.png").write_bytes(b"\x89PNG")
    done = cli(["export", str(run), "--out", str(export), "--overwrite"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (export / "ccfs_set.beton").is_file() and not left.exists() and "interrupted export" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".set")) == []
    # a teacher kept inside an earlier export is an input of the run: that export is not replaced
    state = json.loads((run / "state.json").read_text())
    shutil.copy(state["settings"]["teacher"], export / "teacher.pt")
    state["settings"]["teacher"] = str(export / "teacher.pt")
    (run / "state.json").write_text(json.dumps(state))
    done = cli(["export", str(run), "--out", str(export), "--overwrite"], tmp_path)
    assert done.returncode == 2 and (export / "teacher.pt").is_file(), done.stderr[-2000:]
    one_line_error(done.stderr, "an input of the run")


class _Payload:
    """A pickled object whose loading would run code (creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    src = tmp_path / "src"
    write_cifar10(src, class_images(100, 10, 32, seed=1), class_images(20, 10, 32, seed=2))
    batch = src / "cifar-10-batches-py" / "data_batch_1"
    data = pickle.loads(batch.read_bytes(), encoding="bytes")
    data[b"trap"] = _Payload(str(tmp_path / "ran"))
    batch.write_bytes(pickle.dumps(data, protocol=2))
    assert main(["build", "cifar10", "--src", str(src), "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, "data_batch_1: the pickle names posix.system", "it is not loaded")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()


def test_labels_that_are_not_labels_are_refused_by_every_builder(tmp_path, capsys):
    """Fractional labels, a label beyond the set's classes and a label outside the named classes: one
    line naming the row and the value, for parquet, tensors, arrays and CIFAR batches."""
    x, y = class_images(40, 10, 16, seed=3)
    y = np.arange(40) % 10
    cases = []
    write_hub_parquet(tmp_path / "float", list(x), y + 0.7, None, label_dtype=np.float64)
    cases.append((["parquet", "--src", str(tmp_path / "float")], "label 0.7 at row 0 is not a whole number"))
    write_hub_parquet(tmp_path / "named", list(x), np.where(y == 9, 12, y), [f"c{c}" for c in range(10)])
    cases.append((["parquet", "--src", str(tmp_path / "named")], "label 12 at row 9 lies outside 0..9 (10 classes"))
    twelve = np.where(np.arange(40) == 39, 12, y)
    images, labels = write_tensor_pair(tmp_path / "t", x, twelve)
    cases.append((["tensors", "--images", str(images), "--labels", str(labels), "--normalized-with", "cifar10"],
                  "no image has label 10, 11 although label 12 (row 39) makes 13 classes"))
    np.savez(tmp_path / "a.npz", x=x, y=twelve)
    cases.append((["arrays", "--src", str(tmp_path / "a.npz")], "no image has label 10, 11 although label 12"))
    src = tmp_path / "cifar"
    write_cifar10(src, class_images(100, 10, 32, seed=1), class_images(20, 10, 32, seed=2))
    batch = src / "cifar-10-batches-py" / "data_batch_2"
    data = pickle.loads(batch.read_bytes(), encoding="bytes")
    data[b"labels"][5] = 12
    batch.write_bytes(pickle.dumps(data, protocol=2))
    cases.append((["cifar10", "--src", str(src)], "label 12 at row 25 lies outside 0..9"))
    for k, (args, needle) in enumerate(cases):
        out = ["--out", str(tmp_path / (f"o{k}.beton" if args[0] != "cifar10" else f"o{k}"))]
        assert main(["build", *args, *out]) == 2, args
        one_line_error(capsys.readouterr().err, needle)
        assert not any(tmp_path.glob(f"o{k}*"))


def test_damaged_files_and_non_finite_numbers_end_in_one_line(engine_data, finished_run, tmp_path, capsys):
    """A parquet shard cut in half or empty, a metrics.json cut short or empty, NaN / infinite settings
    (with --smoke too), a pool cut short: exit 2, one line, what is wrong and what to do."""
    x = class_images(20, 10, 16, seed=3)[0]
    shards = write_hub_parquet(tmp_path / "hub", list(x), np.arange(20) % 10, None) / "data"
    first = sorted(shards.iterdir())[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    assert main(["build", "parquet", "--src", str(shards), "--out", str(tmp_path / "p.beton")]) == 2
    one_line_error(capsys.readouterr().err, "not a whole parquet file", "download the shard again")
    first.write_bytes(b"")
    assert main(["build", "parquet", "--src", str(shards), "--out", str(tmp_path / "p.beton")]) == 2
    one_line_error(capsys.readouterr().err, "empty (0 bytes)")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for text, what in (('{"phases": [', "cut short or not JSON"), ("", "empty")):
        (run / "metrics.json").write_text(text)
        assert main(["report", str(run)]) == 2
        one_line_error(capsys.readouterr().err, f"metrics.json is damaged ({what}", "--resume")
    out = str(tmp_path / "never")
    for flag, value in (("--alpha", "nan"), ("--lr", "nan"), ("-T", "nan"), ("--momentum", "inf"),
                        ("--weight-decay", "nan")):
        fails_fast([*run_args(engine_data, out), flag, value], f"{flag} {value}: must be a finite number")
    fails_fast([*run_args(engine_data, out), "--smoke", "--alpha", "inf"], "--alpha inf: must be a finite number")
    short = tmp_path / "short"
    _copy_beton(engine_data["pool"], short / "pool.beton")
    size = (short / "pool.beton").stat().st_size
    with open(short / "pool.beton", "r+b") as fh:
        fh.truncate(size - 1024)
    assert main(run_args({**engine_data, "pool": short / "pool.beton"}, out)) == 2
    one_line_error(capsys.readouterr().err, f"truncated: {size - 1024:,} of the {size:,} bytes", "copy it again")
    assert not Path(out).exists()


def test_nothing_is_left_in_the_cache_or_the_temp_folder(engine_data, finished_run, tmp_path):
    """A cache write killed mid-way (its temp file, 0 bytes) is swept by the next run; with a cache that
    cannot be written, `report` leaves no matplotlib folder in the temp directory."""
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "ccfs-fast"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = cache / f".teacher_pass-0123.npz.tmp-{dead.pid}.npz"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"")
    done = subprocess.run([*CLI, *run_args(engine_data, tmp_path / "r", "--curriculum-num", "1", "--num-eval", "0",
                                           "--epochs", "1")], capture_output=True, text=True, env=cli_env(),
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()
    locked = tmp_path / "not_a_folder"  # a cache that cannot be written (even by root)
    locked.write_text("")
    temp = tmp_path / "temp"
    temp.mkdir()
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    env = {**cli_env(), "XDG_CACHE_HOME": str(locked), "TMPDIR": str(temp)}
    env.pop("MPLCONFIGDIR", None)
    report = subprocess.run([*CLI, "report", str(run)], capture_output=True, text=True, env=env, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (run / "report.png").is_file() and list(temp.iterdir()) == []
