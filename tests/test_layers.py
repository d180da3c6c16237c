"""The layers run one way, and the test command enforces it: `lint-imports` (run by `make test`, its
contracts in pyproject.toml) passes on this tree and fails, naming the import, on a copy of it where a
lower layer imports a higher one."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tree), "PATH": str(LINT.parent)})


def test_the_layers_hold_and_a_violating_import_fails_the_linter(tmp_path):
    for name in ("ccfs_fast", "beton_builder", "benchmarks", "pyproject.toml"):
        source = ROOT / name
        (shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy2(source, tmp_path / name))
    clean = _lint(tmp_path)
    assert clean.returncode == 0, clean.stdout[-3000:]
    assert "0 broken" in clean.stdout
    kernels = tmp_path / "ccfs_fast" / "selection" / "kernels.py"
    kernels.write_text(kernels.read_text() + "\n\nfrom ccfs_fast.runs.config import RunConfig  # noqa: E402\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "ccfs_fast.selection.kernels -> ccfs_fast.runs.config" in broken.stdout
    assert "ccfs_fast.selection is not allowed to import ccfs_fast.runs" in broken.stdout
