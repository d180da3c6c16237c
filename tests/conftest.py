"""Shared fixtures: small datasets in the real on-disk formats, converted once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from formats import class_images, write_cifar10  # noqa: E402

PUBLISHED_SCORES = Path(__file__).resolve().parents[1] / "scores"  # the paper's files, shipped in scores/


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The teacher-pass cache of every test lives in the session's temp folder, not ~/.cache."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield


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
    from beton_builder.beton import BetonFile
    from ccfs_fast.data.readers import iterate_rows

    beton = BetonFile.open(beton_path)
    rows = np.arange(beton.n) if rows is None else rows
    parts = list(iterate_rows(beton, rows, 256, 2))
    return tuple(torch.cat([p[k] for p in parts]).numpy() for k in range(3))


@pytest.fixture(scope="session")
def engine_data(tmp_path_factory):
    """A CIFAR-10-format pool (800) and test set (200), a distilled folder (6 per class) and a
    small teacher with forgetting scores, all made through the CLI."""
    from formats import write_image_folder

    from ccfs_fast.cli import main

    root = tmp_path_factory.mktemp("engine")
    write_cifar10(root / "src", class_images(800, 10, 32, seed=1, separation=40),
                  class_images(200, 10, 32, seed=2, separation=40))
    x, y = class_images(60, 10, 32, seed=3, separation=40)
    write_image_folder(root / "distilled", x, np.repeat(np.arange(10), 6), [f"c{i}" for i in range(10)])
    betons = root / "betons"
    assert main(["build", "cifar10", "--src", str(root / "src"), "--out", str(betons)]) == 0
    assert main(["build", "folder", "--src", str(root / "distilled"), "--out", str(betons / "d.beton")]) == 0
    assert main(["teacher", "--pool", str(betons / "cifar10_train.beton"), "--test", str(betons / "cifar10_test.beton"),
                 "--model", "convnet_small", "--epochs", "6", "--output", str(root / "teacher.pt"),
                 "--forgetting-out", str(root / "forgetting.npy")]) == 0
    return {"pool": betons / "cifar10_train.beton", "test": betons / "cifar10_test.beton",
            "distilled": betons / "d.beton", "teacher": root / "teacher.pt", "scores": root / "forgetting.npy",
            "root": root}


def run_args(data: dict, out, *extra: str) -> list[str]:
    """A small, fast `ccfs-fast run` (ipc 20, alpha 0.2 -> 4 distilled + 16 selected per class)."""
    return ["run", "--pool", str(data["pool"]), "--test", str(data["test"]), "--distilled", str(data["distilled"]),
            "--teacher", str(data["teacher"]), "--teacher-model", "convnet_small", "--filter-model", "convnet_small",
            "--eval-model", "convnet_small", "--image-per-class", "20", "--alpha", "0.2", "--curriculum-num", "3",
            "--score", "forgetting", "--score-path", str(data["scores"]), "--epochs", "3", "--lr", "0.05",
            "--lr-warmup-epochs", "1", "--num-eval", "2", "--seed", "5", "--output-dir", str(out), *extra]


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    """`args` with `flag` set to `value` (replaced, or appended when absent)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.fixture(scope="session")
def finished_run(engine_data, tmp_path_factory):
    """The output directory of one small finished `ccfs-fast run`."""
    from ccfs_fast.cli import main

    out = tmp_path_factory.mktemp("run") / "out"
    assert main(run_args(engine_data, out)) == 0
    return out


def cli_env() -> dict:
    """The environment of a `ccfs-fast` child process in the tests: unbuffered, so its lines arrive."""
    import os

    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def one_line_error(stderr: str, *needles: str) -> str:
    """The single `ccfs-fast: error:` line of a command's stderr (progress bars split off), holding
    every needle."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith("ccfs-fast: error:")]
    assert len(lines) == 1, stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


FAST = ("import sys, json; from ccfs_fast.cli import main; rc = main(json.loads(sys.argv[1])); "
        "print(json.dumps([m for m in ('torch', 'ffcv') if m in sys.modules])); sys.exit(rc)")


def fails_fast(args: list[str], needle: str, heavy_allowed: bool = False) -> None:
    """`ccfs-fast ARGS` in a fresh process refuses in one line (exit 2) holding `needle`, before anything
    heavy is imported (torch, FFCV: seconds), whatever the machine's load."""
    import json
    import subprocess

    proc = subprocess.run([sys.executable, "-c", FAST, json.dumps(args)], capture_output=True, text=True, timeout=120,
                          env=cli_env())
    assert proc.returncode == 2, proc.stderr
    heavy = json.loads(proc.stdout)
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ccfs-fast: error:") and needle in err[0], err
    assert heavy_allowed or not heavy, (args, heavy)


SNAPSHOT = Path(__file__).parent / "data" / "selections_before_layers.json"


def snapshot_machine() -> dict:
    """What a recorded selection's floating-point arithmetic depends on: the CPU, torch and its threads."""
    from ccfs_fast.runs.environment import cpu_model

    return {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def check_snapshot(name: str, run_dir: Path) -> bool:
    """The run's selection and final accuracies equal, bit for bit, those recorded before the engine was
    restructured into layers (tests/data/selections_before_layers.json; CCFS_RECORD_SNAPSHOT=1 records
    them). They depend on the CPU's floating-point kernels, so they are compared on the machine kind they
    were recorded on; returns whether they were compared."""
    import json
    import os

    metrics = json.loads((run_dir / "metrics.json").read_text())
    now = {"selected": json.loads((run_dir / "selected_indices.json").read_text())["idx_selected"],
           "final_accs": (metrics.get("final") or {}).get("accs"),
           "filter_accs": [p["filter_acc"] for p in metrics["phases"]]}
    recorded = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.is_file() else {}
    if os.environ.get("CCFS_RECORD_SNAPSHOT") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        recorded.update({"machine": snapshot_machine(), name: now})
        SNAPSHOT.write_text(json.dumps(recorded, indent=1) + "\n")
        return True
    if recorded.get("machine") != snapshot_machine():
        return False
    assert now == recorded[name]
    return True


def inputs_of(data: dict, **settings: object):
    """The Inputs part of a run on `data`'s files (pool, test, distilled, teacher), with more `settings`."""
    from ccfs_fast.runs.config import Inputs

    return Inputs(**{k: data[k] for k in ("pool", "test", "distilled", "teacher")}, **settings)
