"""The README is true: its CIFAR-10 command block runs as written, its preset table is the registry's,
and nothing a user reads (README, docs, help texts) points outside the repository."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from formats import class_images, write_cifar10, write_image_folder

from ccfs_fast.cli import make_parser
from ccfs_fast.runs.presets import preset_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands_block(heading: str = "### The commands") -> list[list[str]]:
    """The commands of the README's first bash block after `heading`, continuation lines joined, comments off."""
    block = README.split(heading, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def cpu_sized(argv: list[str]) -> list[str]:
    """What a user without a GPU changes: the teacher CPU-sized, the run with --smoke on the CPU."""
    out = list(argv)
    if out[1] == "teacher":
        for flag, value in (("--model", "convnet_tiny"), ("--epochs", "1"), ("--device", "cpu")):
            out[out.index(flag) + 1] = value
    elif out[1] == "run":
        out[out.index("--device") + 1] = "cpu"
        out.append("--smoke")
    return out


def test_preset_table_is_the_registry():
    table = README.split("<!-- presets:", 1)[1].split("-->", 1)[1].split("<!-- /presets -->", 1)[0].strip()
    assert table == preset_table()


def test_nothing_user_facing_points_outside_the_repository():
    texts = {"README.md": README, **{str(p.relative_to(ROOT)): p.read_text()
                                     for p in [*(ROOT / "docs").glob("*.md"), ROOT / "scores" / "README.md"]}}
    parser = make_parser()
    texts["ccfs-fast --help"] = parser.format_help()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # every sub-command's help
        texts[f"ccfs-fast {name} --help"] = sub.format_help()
    for name, text in texts.items():
        assert "../shared" not in text and "shared/" not in text, name  # links inside: test_docs.py


def _write_cifar10_archive(root: Path, train: int = 50_000, test: int = 10_000) -> Path:
    """cifar-10-python.tar.gz as published (cifar-10-batches-py/ with 5 train batches and a test
    batch), by default 50,000 + 10,000 generated images, so the published score file lines up (random
    pixels: only the format matters here; gzip stores them uncompressed, as they would not compress)."""
    rng = np.random.default_rng(1)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10

    write_cifar10(root / "src", split(train), split(test))
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=0) as tar:
        tar.add(root / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_readme_commands_run_as_written(tmp_path):
    """Every command of the README's CIFAR-10 block, in order, in a folder holding what its inputs
    section names (the published archive's format, a CDA-style distilled folder, the teacher made by
    its `teacher` command); only the sizes a CPU user would change are changed."""
    _write_cifar10_archive(tmp_path)
    x, _ = class_images(500, 10, 32, seed=3, separation=40)
    write_image_folder(tmp_path / "cda_cifar10_ipc500", x, np.repeat(np.arange(10), 50),
                       [f"{c:05d}" for c in range(10)])
    commands = commands_block()
    assert [c[1] for c in commands] == ["build", "build", "teacher", "run", "eval", "report"]
    for argv in commands:
        assert argv[0] == "ccfs-fast"
        done = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", *cpu_sized(argv)[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
        if argv[1] == "run":
            run_console = done.stdout
    run = tmp_path / "runs" / "cifar10-ipc500"
    selection = json.loads((run / "selected_indices.json").read_text())
    assert selection["complete"] and selection["ipc"] == 500 and selection["alpha"] == 0.1
    assert "published forgetting scores" in (run / "exp_log.txt").read_text()
    assert "forgetting_CIFAR10.npy" in json.loads((run / "metrics.json").read_text())["settings"]["score_path"]
    last = run_console.strip().splitlines()
    assert last[-2].startswith("final:") and last[-1].startswith("note: --smoke:")  # the CPU-sized run says so
    for name in ("report.png", "selection.png", "curves.csv", "eval.json"):
        assert (run / name).is_file(), name


def test_first_run_on_a_cpu_runs_as_written(tmp_path):
    """The README's CPU block, as written, on a CIFAR-10-format archive smaller than CIFAR-10 (5,000 +
    1,000 images) and a distilled folder of 10 images per class: --smoke fits the preset to them and
    says what it changed; the run finishes and its last line says its accuracies mean nothing."""
    from formats import class_images, write_image_folder

    _write_cifar10_archive(tmp_path, 5_000, 1_000)
    x, _ = class_images(100, 10, 32, seed=3, separation=40)
    write_image_folder(tmp_path / "distilled", x, np.repeat(np.arange(10), 10), [f"{c:05d}" for c in range(10)])
    commands = commands_block("## A first run on a CPU")
    assert [c[1] for c in commands] == ["build", "build", "teacher", "run"]
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr[-3000:])
    console = done.stdout.strip().splitlines()
    assert console[-1] == "note: --smoke: a CPU-sized run; its accuracies are not meaningful"
    assert "ipc 500 -> 109 (alpha 0.1: 10 distilled + 99 real images per class)" in done.stdout
    selection = json.loads((tmp_path / "runs" / "first" / "selected_indices.json").read_text())
    assert selection["complete"] and selection["ipc"] == 109


def test_readme_is_short():
    assert len(README.splitlines()) <= 250
