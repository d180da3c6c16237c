"""Builds that cannot mix or hang, with real processes: two builds into one folder (the second refused
at once; splits of two builds never pass as a pair), a disk that fills (a one-line failure within
seconds, nothing left in /dev/shm or on the disk), a build on one CPU (it exits), and an interrupted
build's half-written output (rebuilt, never refused as existing)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, one_line_error
from formats import class_images, write_cifar10

from beton_builder.base.errors import DataError
from beton_builder.beton import BetonFile
from beton_builder.manifest import manifest_path
from ccfs_fast.cli import main
from ccfs_fast.runs.workspace import check_splits

CLI = [sys.executable, "-m", "ccfs_fast.cli"]
ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Two CIFAR-10-format sources of different pixels, large enough that a build takes seconds."""
    root = tmp_path_factory.mktemp("sources")
    for name, seed in (("a", 1), ("b", 5)):
        write_cifar10(root / name, class_images(20_000, 10, 32, seed=seed), class_images(2_000, 10, 32, seed=seed + 1))
    return root / "a", root / "b"


def test_two_builds_into_one_folder_never_mix(two_sources, tmp_path):
    """The second build into a folder a build is writing is refused at once (exit 2, naming the first's
    pid); splits of two builds copied together are refused by the run's check, naming both files."""
    out = tmp_path / "data"
    first = subprocess.Popen([*CLI, "build", "cifar10", "--src", str(two_sources[0]), "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.time() + 120
    while not (out / ".ccfs-fast-build.lock").exists():
        assert first.poll() is None and time.time() < deadline, "the first build did not start"
        time.sleep(0.02)
    second = subprocess.run([*CLI, "build", "cifar10", "--src", str(two_sources[1]), "--out", str(out)],
                            capture_output=True, text=True, env=cli_env(), timeout=120)
    assert second.returncode == 2  # refused while the first holds the lock (the message names it)
    one_line_error(second.stderr, "is being written by another ccfs-fast build", f"pid {first.pid}")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    pool, test = BetonFile.open(out / "cifar10_train.beton"), BetonFile.open(out / "cifar10_test.beton")
    assert pool.manifest.build_digest and pool.manifest.build_digest == test.manifest.build_digest
    check_splits(pool, test)
    other = tmp_path / "other"
    assert main(["build", "cifar10", "--src", str(two_sources[1]), "--out", str(other)]) == 0
    for suffix in ("", ".json", ".rows.npz"):  # the test split of another build copied over
        shutil.copy(f"{other / 'cifar10_test.beton'}{suffix}", f"{out / 'cifar10_test.beton'}{suffix}")
    with pytest.raises(DataError, match="come from two different builds"):
        check_splits(BetonFile.open(out / "cifar10_train.beton"), BetonFile.open(out / "cifar10_test.beton"))


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def test_a_full_disk_fails_a_build_within_seconds(two_sources, tmp_path):
    """A build into a tmpfs too small for it: a writing worker hits ENOSPC; the build exits 2 within
    seconds with one line, leaving no temp file on the disk and no segment in /dev/shm."""
    if not ROOT:
        pytest.skip("mounting a small file system needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        before = _shm()
        started = time.perf_counter()
        done = subprocess.run([*CLI, "build", "cifar10", "--src", str(two_sources[0]), "--out", str(small / "data")],
                              capture_output=True, text=True, env=cli_env(), timeout=120)
        seconds = time.perf_counter() - started
        assert done.returncode == 2 and seconds < 60, (seconds, done.stderr[-2000:])
        one_line_error(done.stderr, "No space left on device", "free some space")
        assert "Traceback" not in done.stderr
        time.sleep(0.5)
        assert _shm() - before == set(), "a /dev/shm segment outlived the build"
        leftovers = [p.name for p in small.rglob("*") if p.is_file() and not p.name.startswith(".ccfs-fast-build")]
        assert leftovers == [], leftovers
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_a_build_on_one_cpu_exits(tmp_path):
    """Under `taskset -c 0` (one CPU), a build writes its output and the process ends."""
    if shutil.which("taskset") is None:
        pytest.skip("no taskset")
    x, y = class_images(200, 4, 8, seed=0)
    np.savez(tmp_path / "small.npz", x=x, y=y)
    done = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "ccfs_fast.cli", "build", "arrays", "--src",
                           str(tmp_path / "small.npz"), "--out", str(tmp_path / "s.beton")], capture_output=True,
                          text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert BetonFile.open(tmp_path / "s.beton").n == 200


def test_a_half_written_output_is_built_again(tmp_path, capsys):
    """A manifest without its .beton (a build stopped before its last rename, a disk that filled): the
    next build says so and builds it again, instead of calling it an existing output; a .beton without
    a manifest (not one of ours: ours is renamed into place last) is never removed without --overwrite."""
    x, y = class_images(40, 4, 8, seed=0)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    out = tmp_path / "d.beton"
    assert main(["build", "arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)]) == 0
    out.unlink()  # a manifest whose .beton never arrived
    capsys.readouterr()
    assert main(["build", "arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)]) == 0
    assert "the manifest of an interrupted build" in capsys.readouterr().err
    assert BetonFile.open(out).n == 40
    manifest_path(out).unlink()  # a .beton with no manifest: someone else's file
    assert main(["build", "arrays", "--src", str(tmp_path / "a.npz"), "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert out.is_file()


PID_ONE = """
import os, sys
from multiprocessing import get_context
from beton_builder.base.processes import children_die_with_parent, die_with_parent, run_isolated
assert os.getpid() == 1, os.getpid()
children_die_with_parent()
print(run_isolated(print, "isolated child ran"), flush=True)
with get_context("fork").Pool(2, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
    print("pool", pool.map(abs, [-1, -2]), flush=True)
pid = os.fork()
if pid == 0:
    print("forked child ran", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_children_of_a_pid_one_parent_run():
    """A command that is a container's entry point (pid 1, here a new pid namespace) forks workers
    that run: a parent with pid 1 is alive, not a sign that the worker's parent died."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no new pid namespace here (unshare: {probe.stderr.decode().strip()[:80]})")
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_ONE],
                          capture_output=True, text=True, timeout=120, env=cli_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == ["isolated child ran", "None", "pool [1, 2]", "forked child ran"], done.stdout
