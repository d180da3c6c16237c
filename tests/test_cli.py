"""The command line as a new user meets it: help with every default and choice, errors before any
heavy import, smoke runs that just work, `eval --run-dir`, failed runs that leave nothing behind."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import fails_fast, run_args, set_flag
from formats import class_images, write_image_folder

from beton_builder.beton import BetonFile
from ccfs_fast.cli import main

HELP_NEEDLES = {
    ("run",): ["(default: 500)", "(default: 0.2)", "(default: 20.0)", "(default: 5)", "(default: resnet18)",
               "cifar10-ipc500", "tiny-imagenet-ipc100", "convnet_tiny", "simple (easiest first)",
               "forgetting (low = easy)", "fill (top a short", "(default: lazy)", "(default: auto)",
               "(default: on for CUDA)"],
    ("eval",): ["--run-dir", "(default: 5)", "(default: 500)", "cifar10-ipc500", "(default: resnet18)"],
    ("teacher",): ["(default: 200)", "(default: 0.1)", "(default: 0.0005)", "(default: 128)", "(default: resnet18)"],
    ("build",): ["cifar10", "tiny-imagenet", "folder", "arrays"],
    ("build", "folder"): ["--class-order", "(default: sorted)", "(default: all)"],
    ("build", "cifar10"): ["--src", "(default: refuse)"],
    ("demo",): ["(default: 15)", "(default: demo_out)"],
    ("report",): ["run_dir"],
    ("bench",): ["loader", "select", "phase", "train"],
    ("bench", "train"): ["--quick", "--json"],
    ("bench", "phase"): ["--quick", "--repeats", "median"],
    (): ["COMMAND", "build", "teacher", "run", "eval", "report", "demo", "bench", "a whole run, step by step"],
}


@pytest.mark.parametrize("command", list(HELP_NEEDLES))
def test_every_help_shows_defaults_and_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in HELP_NEEDLES[command]:
        assert " ".join(needle.split()) in text, needle
    if command in (("run",), ("eval",), ("teacher",)):
        assert text.count("(default:") >= 20


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])
    assert exit_info.value.code == 0 and "wall-clock per curriculum" in capsys.readouterr().out


def test_bad_arguments_fail_before_heavy_imports(engine_data, tmp_path):
    """A missing file or a bad value is reported (exit 2, one line) before torch or FFCV load."""
    cases = [set_flag(run_args(engine_data, tmp_path / "o"), "--pool", str(tmp_path / "none.beton")),
             set_flag(run_args(engine_data, tmp_path / "o"), "--score-path", str(tmp_path / "none.npy")),
             set_flag(run_args(engine_data, tmp_path / "o"), "--alpha", "2"),
             set_flag(run_args(engine_data, tmp_path / "o"), "--normalize", "1,2")]
    code = ("import sys, json; from ccfs_fast.cli import main; rc = main(json.loads(sys.argv[1])); "
            "print(json.dumps(['torch' in sys.modules, 'ffcv' in sys.modules])); sys.exit(rc)")
    for args in cases:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert json.loads(proc.stdout) == [False, False], args
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("ccfs-fast: error:")
    assert not (tmp_path / "o").exists()


def test_smoke_run_with_two_epochs_just_works(engine_data, tmp_path, capsys):
    """--epochs 2 with the default 5-epoch warm-up: clamped to 1, said once, recorded."""
    args = run_args(engine_data, tmp_path / "smoke", "--curriculum-num", "1", "--num-eval", "0")
    i = args.index("--lr-warmup-epochs")
    del args[i:i + 2]
    assert main(set_flag(args, "--epochs", "2")) == 0
    note = "note: --lr-warmup-epochs 5 does not fit --epochs 2; using 1 warm-up epoch"
    console = capsys.readouterr()
    assert (console.out + console.err).count(note) == 1
    metrics = json.loads((tmp_path / "smoke" / "metrics.json").read_text())
    assert metrics["notes"].count(note) == 1 and metrics["settings"]["lr_warmup_epochs"] == 1
    assert [n for n in metrics["notes"] if n != note and not n.startswith("warning: score file")] == []


def test_failed_run_leaves_no_output_directory(engine_data, tmp_path):
    """A run that fails after creating --output-dir removes it and every parent it created."""
    np.save(tmp_path / "short.npy", np.zeros(799, np.float32))  # the pool has 800 images
    out = tmp_path / "runs" / "new" / "failed"
    assert main(set_flag(run_args(engine_data, out), "--score-path", str(tmp_path / "short.npy"))) == 2
    assert not (tmp_path / "runs").exists()
    assert main(set_flag(run_args(engine_data, out), "--filter-model", "resnet19")) == 2  # an unknown model name
    assert not (tmp_path / "runs").exists()


def test_failed_build_leaves_no_new_folders(tmp_path, capsys):
    """A build whose source turns out wrong (an existing folder without CIFAR batches) removes the
    output folder it created, parents included."""
    (tmp_path / "notcifar").mkdir()
    assert main(["build", "cifar10", "--src", str(tmp_path / "notcifar"), "--out", str(tmp_path / "a" / "b")]) == 2
    assert not (tmp_path / "a").exists()
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ccfs-fast: error:")


def test_errors_that_can_come_at_once_do(engine_data, tmp_path):
    """The one-line error before torch is imported where the check does not need it; no folder is left
    behind."""
    run = run_args(engine_data, tmp_path / "o")
    fails_fast(set_flag(set_flag(run, "--image-per-class", "40"), "--alpha", "0.5"),
                "class 'c0' (label 0) has 6 images, fewer than the 20 distilled images per class")
    fails_fast(["report", str(tmp_path)], "has no metrics.json")
    fails_fast(["build", "cifar10", "--src", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "d")],
                "--src")
    fails_fast(["build", "folder", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "d.beton")],
                "no such file or folder")
    import torch

    if not torch.cuda.is_available():  # the check needs torch itself
        fails_fast(set_flag(run, "--device", "cuda"), "torch sees no CUDA device", heavy_allowed=True)
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("name", ["loader", "select", "phase", "train"])
def test_bench_help_shows_every_default(name, capsys):
    from importlib import import_module

    from ccfs_fast.cli.commands import BENCHMARKS

    with pytest.raises(SystemExit):
        import_module(BENCHMARKS[name][0]).main(["--help"])
    text = capsys.readouterr().out
    options = [block for block in re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]
               if not block.startswith("-h")]
    assert options and all("(default:" in " ".join(block.split()) for block in options), options


def test_eval_run_dir_reproduces_the_run(finished_run, tmp_path, capsys):
    """eval --run-dir: the run's accuracies, printed beside its own, with what the selection holds
    per class against its target; its JSON goes beside the selection unless --output says otherwise."""
    final = json.loads((finished_run / "metrics.json").read_text())["final"]
    settings = json.loads((finished_run / "metrics.json").read_text())["settings"]
    assert settings["teacher_model"] == "convnet_small" and settings["temperature"] == 20.0
    assert main(["eval", "--run-dir", str(finished_run), "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["accs"] == final["accs"] and result["ipc"] == 20
    assert result["images_per_class"] == [20] * 10
    assert result["real_per_class_target"] == 16 and result["unmet"] == 0
    out = capsys.readouterr().out
    assert "the run's best acc" in out and f"(the run's: {np.mean(final['accs']):.2f}%" in out
    assert "trained on: 4 distilled + 16 of 16 real images per class" in out
    assert not (finished_run / "eval.json").exists()  # --output given
    # explicit flags override what the run directory says
    assert main(["eval", "--run-dir", str(finished_run), "--num-eval", "1", "--epochs", "1",
                 "--output", str(tmp_path / "f.json")]) == 0
    assert len(json.loads((tmp_path / "f.json").read_text())["accs"]) == 1


@pytest.mark.parametrize("order,expected", [("sorted", ["0", "1", "10", "11", "2", "3", "4", "5", "6", "7", "8", "9"]),
                                            ("numeric", [str(c) for c in range(12)])])
def test_build_folder_numeric_class_names(tmp_path, capsys, order, expected):
    x, _ = class_images(24, 12, 16, seed=0)
    labels = np.repeat(np.arange(12), 2)
    write_image_folder(tmp_path / "d", x, labels, [str(c) for c in range(12)])
    out = tmp_path / "d.beton"
    assert main(["build", "folder", "--src", str(tmp_path / "d"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--class-order sorted" in err and "--class-order numeric" in err and not out.exists()
    assert main(["build", "folder", "--src", str(tmp_path / "d"), "--out", str(out), "--class-order", order]) == 0
    assert list(BetonFile.open(out).manifest.class_names) == expected


def test_demo_console_has_no_traceback(tmp_path):
    """The demo as a user runs it (a real process): every stage, no traceback of any kind on stdout or
    stderr, the summary table on lines of its own."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", "demo", "--output-dir", str(out), "--epochs", "3",
                           "--teacher-epochs", "3", "--num-eval", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "Traceback" not in console and "Exception ignored" not in console, console[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "images/class" in line)
    assert lines[header].startswith("method") and lines[header + 1].startswith("----")
    for method in ("teacher (full pool, labels)", "CCFS (distilled + selected)", "random real", "distilled only",
                   "full pool"):
        assert any(line.startswith(method) for line in lines), method
    sel = json.loads((out / "ccfs_run" / "selected_indices.json").read_text())
    assert sel["ipc"] == 20 and len(sel["idx_selected"]) == 16 * 10
    again = subprocess.run([sys.executable, "-m", "ccfs_fast.cli", "demo", "--output-dir", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2  # an existing demo is not overwritten silently


@pytest.mark.parametrize("argv, needle", [
    (["run", "--pool", "p.beton", "--distiled", "d.beton"], "unknown flag --distiled for `ccfs-fast run` (did you "
                                                           "mean --distilled?)"),
    (["build", "folder", "--srcc", "x"], "unknown flag --srcc for `ccfs-fast build folder` (did you mean --src?)"),
    (["eval", "--lables", "hard"], "unknown flag --lables for `ccfs-fast eval` (did you mean --labels?)"),
])
def test_a_mistyped_flag_is_named_in_one_line(argv, needle, capsys):
    """A typo gets one line naming it and the closest flag, not the whole usage."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"ccfs-fast: error: {err.split('error: ', 1)[1].strip()}"]
    assert needle in err and "usage:" not in err


def test_a_mistyped_preset_or_setting_gets_a_suggestion():
    from beton_builder.base.errors import UnknownNameError
    from ccfs_fast import EvalConfig, make_config, make_run_config

    with pytest.raises(UnknownNameError, match=r"unknown preset 'cifar10-ipc5000' \(did you mean 'cifar10-ipc500'\?\)"):
        make_run_config(preset="cifar10-ipc5000")
    with pytest.raises(UnknownNameError, match=r"unknown EvalConfig setting 'pol' \(did you mean 'pool'\?\)"):
        make_config(EvalConfig, pol="x.beton")
    # an unambiguous prefix is argparse's to accept, not a typo
    from ccfs_fast.cli import make_parser, unknown_flag

    assert unknown_flag(make_parser(), ["run", "--distil", "d.beton"]) is None
    assert unknown_flag(make_parser(), ["bench", "select", "--quick"]) is None


def test_the_console_script_sets_openmp_waits_before_anything_loads_torch(monkeypatch):
    """entry() sets GOMP_SPINCOUNT before main() runs (libgomp reads it once, when torch loads it), and
    leaves a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY alone."""
    import os

    import ccfs_fast.cli as cli
    from ccfs_fast.data.threads import openmp_defaults

    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "CCFS_FAST_OPENMP_DEFAULTS"):
        monkeypatch.setenv(name, "placeholder")  # restored afterwards, whatever entry() sets
        monkeypatch.delenv(name)
    seen = {}

    def fake_main():
        seen["spin"] = os.environ.get("GOMP_SPINCOUNT")
        return 3

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(cli.os, "_exit", lambda code: seen.setdefault("code", code))
    cli.entry()
    assert seen == {"spin": "10000", "code": 3}
    assert openmp_defaults({"GOMP_SPINCOUNT": "5"}) == {}
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert openmp_defaults(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {}
    assert openmp_defaults(env) == {"GOMP_SPINCOUNT": "10000"}
    assert env == {"GOMP_SPINCOUNT": "10000", "CCFS_FAST_OPENMP_DEFAULTS": "GOMP_SPINCOUNT"}  # named as ours
