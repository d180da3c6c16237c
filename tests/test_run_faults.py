"""A run's way out, with real processes and real signals: Ctrl-C ends with the exact command that
continues, the resumed run says what it kept; refusals that need no data come at once; a run exits on
one CPU."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

from conftest import cli_env, fails_fast, run_args

CLI = [sys.executable, "-m", "ccfs_fast.cli"]


def _terminal_ctrl_c() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as at a terminal, even when the tests run in the background


def test_ctrl_c_prints_the_command_that_continues(engine_data, tmp_path):
    """SIGINT to a real run after its first curriculum: exit 130 and, as the last line, the exact
    command to continue; that command finishes the run and says which curricula it kept."""
    out = tmp_path / "run"
    argv = run_args(engine_data, out, "--epochs", "12", "--num-eval", "1")
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=_terminal_ctrl_c)
    deadline = time.time() + 300
    while not (out / "phase1_candidates.npz").is_file():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "the run did not finish its first curriculum"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()][-1]
    expected = "ccfs-fast: interrupted; continue with: " + shlex.join(["ccfs-fast", *argv, "--resume"])
    assert last == expected
    command = shlex.split(last.split("continue with: ", 1)[1])
    resumed = subprocess.run([*CLI, *command[1:]], capture_output=True, text=True, env=cli_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out}: curricul" in resumed.stdout and "kept" in resumed.stdout
    assert json.loads((out / "selected_indices.json").read_text())["complete"]


def test_refusals_that_need_no_data_come_at_once(engine_data, tmp_path):
    """An output directory holding something else, --resume with --overwrite: exit 2, one line, before
    torch or FFCV is imported."""
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone else's file")
    for extra, needle in (((), "is not empty (notes.txt...)"), (("--resume", "--overwrite"), "pass one of them")):
        fails_fast(run_args(engine_data, busy, *extra), needle)


def test_a_run_left_before_its_first_curriculum_is_started_afresh(engine_data, tmp_path, capsys):
    """What a run that failed before its first curriculum left (a full disk, an interrupt) does not
    block the advice it gave: the same command, or with --resume, starts the run and says so; files of
    those names in a folder no run used are never removed."""
    from ccfs_fast.cli import main

    out = tmp_path / "early"
    out.mkdir()
    (out / ".ccfs-fast.lock").write_text("12345\n")  # a ccfs-fast run held this folder
    (out / "teacher_pass.npz").write_bytes(b"half written")
    (out / "curves.csv").write_text("training,model,epoch\n")
    assert main(run_args(engine_data, out, "--resume", "--num-eval", "0", "--epochs", "1")) == 0
    err = capsys.readouterr().err
    assert "--resume: " in err and "no finished curriculum" in err and "starting the run" in err
    removed = next(ln for ln in err.splitlines() if ln.startswith("note: removed"))
    assert "teacher_pass.npz" in removed and "curves.csv" in removed and "never finished a curriculum" in removed
    assert json.loads((out / "selected_indices.json").read_text())["complete"]


def test_files_no_run_wrote_are_never_removed(engine_data, tmp_path):
    """A folder holding a selection and an eval.json of the paper's scripts (no ccfs-fast run used it)
    is refused, not cleared."""
    from ccfs_fast.cli import main

    out = tmp_path / "papers"
    out.mkdir()
    (out / "selected_indices.json").write_text('{"ipc": 50, "alpha": 0.2, "idx_selected": []}')
    assert main(run_args(engine_data, out)) == 2
    assert (out / "selected_indices.json").is_file()
