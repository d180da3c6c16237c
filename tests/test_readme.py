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
from ccfs_fast.config import preset_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands_block() -> list[list[str]]:
    """The commands of the README's "### The commands" block, continuation lines joined, comments off."""
    block = README.split("### The commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
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
        assert "../" not in text and "shared/" not in text, name


def _write_cifar10_archive(root: Path) -> Path:
    """cifar-10-python.tar.gz as published (cifar-10-batches-py/ with 5 train batches and a test
    batch), 50,000 + 10,000 generated images, so the published score file lines up (random pixels:
    only the format matters here; gzip stores them uncompressed, as they would not compress)."""
    rng = np.random.default_rng(1)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10

    write_cifar10(root / "src", split(50_000), split(10_000))
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
    assert run_console.strip().splitlines()[-1].startswith("final:")
    assert (run / "report.png").is_file() and (run / "eval.json").is_file()
