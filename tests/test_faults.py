"""Faults, one at a time, with real processes and real signals: two runs on one output directory,
inputs changed under --resume, corrupt state and caches, interrupted builds, unfinished selections,
unwritable places and a full disk."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env, inputs_of, one_line_error, run_args
from formats import class_images, write_cifar10

from beton_builder.base.digests import cache_dir, file_sha256
from beton_builder.base.errors import ConfigError, DataError
from beton_builder.base.locks import RunLock, probe_lock
from beton_builder.beton import BetonFile
from beton_builder.manifest import manifest_path
from ccfs_fast.cli import main
from ccfs_fast.runs.teacher_pass import (
    NEAR_TIE,
    disagreement,
    pred_checksum,
    teacher_correct,
    teacher_pass_origin,
    teacher_pass_path,
)
from ccfs_fast.runs.workspace import open_workspace

CLI = [sys.executable, "-m", "ccfs_fast.cli"]
ROOT = os.geteuid() == 0


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120, what: str = "") -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (this test process excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# --- one run per output directory ---------------------------------------------------------------


def test_second_run_on_a_locked_directory_is_refused(engine_data, tmp_path):
    out = tmp_path / "shared"
    first = subprocess.Popen([*CLI, *run_args(engine_data, out, "--epochs", "40", "--num-eval", "0")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    try:
        _wait_for(lambda: (out / "state.json").is_file() or (out / "teacher_pass.npz").is_file(), first,
                  what="the first run to start writing")
        second = subprocess.run([*CLI, *run_args(engine_data, out, "--seed", "1")], capture_output=True, text=True,
                                env=cli_env(), timeout=120)
        assert second.returncode == 2
        one_line_error(second.stderr, "in use by another ccfs-fast run", f"pid {first.pid}")
        resumed = subprocess.run([*CLI, *run_args(engine_data, out), "--resume"], capture_output=True, text=True,
                                 env=cli_env(), timeout=120)
        assert resumed.returncode == 2 and f"pid {first.pid}" in resumed.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    probe_lock(out)  # the kernel released the dead holder's lock: the directory is usable again
    with RunLock(out):
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            probe_lock(out)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# --- --resume checks contents ---------------------------------------------------------------------


@pytest.fixture
def interrupted_run(finished_run, engine_data, tmp_path):
    """A copy of a finished run cut back to its first curriculum, as a run killed in phase 2 leaves it,
    with its own copies of the teacher and the score file (data["teacher"], data["scores"])."""
    out = tmp_path / "interrupted"
    shutil.copytree(finished_run, out)
    data = {**engine_data, "teacher": tmp_path / "teacher.pt", "scores": tmp_path / "forgetting.npy"}
    shutil.copy(engine_data["teacher"], data["teacher"])
    shutil.copy(engine_data["scores"], data["scores"])
    state = json.loads((out / "state.json").read_text())
    first = state["phases"][0]
    state.update(phases=[first], selected=state["selected"][:first["selected"]], final=None)
    state["settings"].update(teacher=str(data["teacher"]), score_path=str(data["scores"]))
    (out / "state.json").write_text(json.dumps(state))
    for k in (2, 3):
        (out / f"phase{k}_candidates.npz").unlink()
    return out, data


def test_resume_refuses_changed_inputs(interrupted_run, capsys):
    out, data = interrupted_run
    original = data["teacher"].read_bytes()
    ckpt = torch.load(data["teacher"], weights_only=True)
    ckpt["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, data["teacher"])  # another teacher of the same architecture, at the same path
    assert main(run_args(data, out, "--resume")) == 2
    one_line_error(capsys.readouterr().err, "the teacher file", "changed since the run started")
    data["teacher"].write_bytes(original)
    np.save(data["scores"], np.load(data["scores"]) + 1)
    assert main(run_args(data, out, "--resume")) == 2
    one_line_error(capsys.readouterr().err, "the score file", "changed since the run started")


def test_resume_with_unchanged_inputs_completes(interrupted_run, finished_run):
    out, data = interrupted_run
    assert main(run_args(data, out, "--resume")) == 0
    interrupted_run = out
    done = json.loads((interrupted_run / "selected_indices.json").read_text())
    assert done["complete"] and done["idx_selected"] == json.loads(
        (finished_run / "selected_indices.json").read_text())["idx_selected"]


def _swapped(selected: list[int]) -> list[int]:
    """One selected index replaced by a pool image the run did not select."""
    other = next(i for i in range(800) if i not in set(selected))
    return selected[:3] + [other] + selected[4:]


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s[: len(s) // 2], "is unreadable"),
    (lambda s: "not json at all", "is unreadable"),
    (lambda s: "{}", "is not a ccfs-fast run state"),
    (lambda s: json.dumps({**json.loads(s), "selected": json.loads(s)["selected"][:-30]}), "is inconsistent"),
    (lambda s: json.dumps({**json.loads(s), "selected": _swapped(json.loads(s)["selected"])}),
     "does not match phase1_candidates.npz: curriculum 1's selection differs at position 3"),
])
def test_corrupt_state_json_is_one_clear_line(interrupted_run, capsys, damage, needle):
    out, data = interrupted_run
    state = out / "state.json"
    state.write_text(damage(state.read_text()))
    assert main(run_args(data, out, "--resume")) == 2
    one_line_error(capsys.readouterr().err, str(state), needle, "--overwrite")


# --- the teacher-pass cache -----------------------------------------------------------------------


def _plain_sha256(pred: np.ndarray) -> np.ndarray:
    """The checksum a hand edit would recompute (what cache entries held before they were signed)."""
    return np.array(hashlib.sha256(np.ascontiguousarray(pred, "<i8").tobytes()).hexdigest())


def _rewrite_entry(entry: Path, **changes) -> None:
    with np.load(entry) as cached:
        fields = {**dict(cached), **changes}
    np.savez(entry.with_suffix(".tmp.npz"), **fields)
    entry.with_suffix(".tmp.npz").replace(entry)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "altered", "forged", "forged_3_rows",
                                    "signed_forgery"])
def test_damaged_teacher_pass_cache_is_replaced(engine_data, capsys, damage):
    """Every damage is reported once, deleted and recomputed: unreadable entries; predictions edited
    (a whole class, or 3 of 800 rows) with the plain checksum recomputed, caught by the entry's keyed
    signature every time; a forgery signed with this user's key (a whole class), caught by the
    teacher's own predictions on a sample."""
    ws = open_workspace(inputs_of(engine_data), 4)
    digest = file_sha256(engine_data["teacher"])
    pred, _, _ = teacher_correct(ws, digest)
    entry = teacher_pass_path(teacher_pass_origin(ws, digest))
    assert entry.is_file() and entry.parent == cache_dir()
    blob = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    elif damage == "garbage":
        entry.write_bytes(os.urandom(500))
    else:  # a valid file whose predictions were edited
        forged = pred.copy()
        if damage == "forged_3_rows":
            forged[[5, 400, 777]] = (forged[[5, 400, 777]] + 1) % 10
        elif damage == "signed_forgery":
            forged[forged == 3] = 4
        else:
            forged = (forged + 1) % 10
        checksum = {"forged": _plain_sha256(forged), "forged_3_rows": _plain_sha256(forged),
                    "signed_forgery": np.array(pred_checksum(forged, teacher_pass_origin(ws, digest)))}
        _rewrite_entry(entry, pred=forged, **({"checksum": checksum[damage]} if damage in checksum else {}))
    capsys.readouterr()
    again, _, from_cache = teacher_correct(ws, digest)
    err = capsys.readouterr().err
    assert not from_cache and again.tolist() == pred.tolist()
    assert err.count("is damaged") == 1 and str(entry) in err
    why = {"signed_forgery": "disagrees with the teacher", "altered": "signature", "forged": "signature",
           "forged_3_rows": "signature"}.get(damage, "unreadable")
    assert why in err, err
    assert teacher_correct(ws, digest)[2]  # rewritten, and sound again


def test_cached_pass_differing_only_on_near_ties_is_accepted(engine_data):
    """A sound entry computed on another device (TF32, bf16, other cuDNN algorithms) may differ from a
    fresh prediction where the top two logits nearly tie: such rows are not compared, so the entry is
    kept; a row with a clear margin that differs is still a disagreement. (An untrained teacher: its
    logits are small, so many of its predictions are near-ties.)"""
    from ccfs_fast.train.models import create_model

    ws = open_workspace(inputs_of(engine_data), 4)
    torch.manual_seed(0)
    ws.teacher = create_model("convnet_small", 10, 32).eval()
    rows = np.arange(ws.space.n_pool)
    index, pred, margin = ws.predict_pool(ws.teacher, rows, "margin")
    assert np.array_equal(index, rows)
    with torch.inference_mode():
        logits = torch.cat([ws.teacher(images).float() for images, _, _ in ws.pool_loader(rows)]).numpy()
    assert np.array_equal(logits.argmax(1), pred)
    ties = np.flatnonzero(margin < NEAR_TIE)
    assert len(ties) >= 10, len(ties)
    entry = pred.copy()
    entry[ties] = np.argsort(logits[ties], axis=1)[:, -2]  # the runner-up, as another device may give
    assert disagreement(ws, entry, sample=len(entry)) is None
    entry[np.argmax(margin)] = (entry[np.argmax(margin)] + 1) % 10  # the clearest prediction changed
    why = disagreement(ws, entry, sample=len(entry))
    assert why is not None and why.startswith(f"it disagrees with the teacher on 1 of the {len(rows) - len(ties)} ")


def _damage_record(record, damage: str, other_digest: str) -> None:
    value = record.read_text()
    record.write_bytes({"random": os.urandom(64), "truncated": value[:20].encode(), "empty": b"",
                        "wrong": other_digest.encode()}[damage])


@pytest.mark.parametrize("damage", ["random", "truncated", "empty", "wrong"])
def test_damaged_digest_record_is_rechecked(engine_data, capsys, damage):
    """The remembered sha256 of a checked .beton, damaged: one warning naming the record, the file
    hashed again, and the sound .beton opens (a wrong-but-valid record never refuses sound data)."""
    from beton_builder.base.digests import digest_record, known_digest

    pool = engine_data["pool"]
    BetonFile.open(pool)
    record = digest_record(pool)
    assert record.is_file()
    _damage_record(record, damage, file_sha256(engine_data["teacher"]))
    capsys.readouterr()
    assert BetonFile.open(pool).manifest.n == 800
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and str(record) in err[0]
    assert known_digest(pool) == file_sha256(pool) and record.read_text() == file_sha256(pool)


def test_run_with_damaged_caches_equals_a_clean_run(engine_data, tmp_path, capsys, monkeypatch):
    """A run whose cache holds a garbage digest record and a forged teacher-pass entry (predictions
    altered, checksum matching): exit 0, one warning for each, and the clean run's selection."""
    from beton_builder.base.digests import digest_record

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    quick = ("--num-eval", "0", "--epochs", "1", "--lr-warmup-epochs", "0")
    assert main(run_args(engine_data, tmp_path / "clean", *quick)) == 0
    _damage_record(digest_record(engine_data["distilled"]), "random", "")
    entries = list((tmp_path / "cache" / "ccfs-fast").glob("teacher_pass-*.npz"))
    assert len(entries) == 1
    with np.load(entries[0]) as cached:
        forged = cached["pred"].copy()
    forged[[10, 20, 30]] = (forged[[10, 20, 30]] + 1) % 10  # 3 rows of 800, the plain checksum recomputed
    _rewrite_entry(entries[0], pred=forged, checksum=_plain_sha256(forged))
    capsys.readouterr()
    assert main(run_args(engine_data, tmp_path / "damaged", *quick)) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "do not match their signature" in warnings[1] and str(entries[0]) in warnings[1]
    for name in ("selected_indices.json", "teacher_pass.npz"):
        clean, damaged = (tmp_path / "clean" / name).read_bytes(), (tmp_path / "damaged" / name).read_bytes()
        assert clean == damaged if name.endswith(".npz") else \
            json.loads(clean)["idx_selected"] == json.loads(damaged)["idx_selected"]


def test_unwritable_cache_is_a_warning(engine_data, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    ws = open_workspace(inputs_of(engine_data), 4)
    pred, _, from_cache = teacher_correct(ws, file_sha256(engine_data["teacher"]))
    assert not from_cache and len(pred) == 800
    assert "warning: the teacher-pass cache" in capsys.readouterr().err


# --- builds are units ------------------------------------------------------------------------------


def test_stale_manifest_beside_a_new_beton_is_refused(engine_data, tmp_path, capsys):
    x, y = class_images(800, 10, 32, seed=9, separation=40)
    other = tmp_path / "other"
    write_cifar10(other, (x, y), class_images(200, 10, 32, seed=2))
    assert main(["build", "cifar10", "--src", str(other), "--out", str(tmp_path / "b")]) == 0
    stale = tmp_path / "stale"
    stale.mkdir()
    shutil.copy(engine_data["pool"], stale / "pool.beton")
    shutil.copy(manifest_path(engine_data["pool"]), manifest_path(stale / "pool.beton"))
    shutil.copy(tmp_path / "b" / "cifar10_train.beton", stale / "pool.beton")  # the new file, the old manifest
    with pytest.raises(DataError, match="rebuild"):
        BetonFile.open(stale / "pool.beton")
    out = tmp_path / "run"
    assert main(run_args({**engine_data, "pool": stale / "pool.beton"}, out)) == 2
    one_line_error(capsys.readouterr().err, "does not match its manifest", "rebuild")
    assert not out.exists()


@pytest.fixture(scope="module")
def big_arrays(tmp_path_factory):
    """An arrays .npz large enough that writing its .beton takes a few seconds."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    np.savez(root / "big.npz", x=rng.integers(0, 256, (60_000, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 60_000))
    return root / "big.npz"


def _ctrl_c_as_at_a_terminal() -> None:
    # A test run started in the background (`make test &`) ignores SIGINT, and its children inherit
    # that (Python then installs no KeyboardInterrupt handler); a command typed at a terminal does not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_build_leaves_no_temp_file_or_worker(big_arrays, tmp_path, sig):
    out = tmp_path / "out" / f"big-{sig.name}.beton"
    out.parent.mkdir()
    proc = subprocess.Popen([*CLI, "build", "arrays", "--src", str(big_arrays), "--out", str(out), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(), start_new_session=True,
                            preexec_fn=_ctrl_c_as_at_a_terminal)
    _wait_for(lambda: any(p.name.startswith(f".{out.name}.tmp-") for p in out.parent.iterdir()), proc,
              what="the temp .beton to appear")
    time.sleep(0.5)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)  # never hangs
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the build did not stop within 30 s of {sig.name}")
    time.sleep(0.5)
    assert _processes_mentioning(str(out)) == [], "worker processes outlived the build"
    assert not out.exists() and not manifest_path(out).exists()
    temps = [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    if sig != signal.SIGKILL:
        assert temps == [] and proc.returncode in (130, 143), proc.returncode
        assert "Traceback" not in proc.stderr.read().decode()
    else:  # nothing can clean up after SIGKILL; the next build into that folder does
        assert len(temps) == 1
        x, y = class_images(20, 2, 8, seed=0)
        np.savez(tmp_path / "small.npz", x=x, y=y)
        rebuilt = subprocess.run([*CLI, "build", "arrays", "--src", str(tmp_path / "small.npz"), "--out",
                                  str(out.parent / "small.beton")], capture_output=True, text=True, env=cli_env(),
                                 timeout=300)
        assert rebuilt.returncode == 0 and "left by an interrupted build" in rebuilt.stderr
        assert [p for p in out.parent.iterdir() if ".tmp-" in p.name] == []


POOL_AFTER_SIGTERM_HANDLER = """
import multiprocessing, signal
from beton_builder.base.processes import children_die_with_parent, handle_sigterm

def disposition(_):
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

handle_sigterm()
children_die_with_parent()
assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
for _ in range(40):  # Pool.__exit__ SIGTERMs its workers each time
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert all(pool.map(disposition, range(8), chunksize=1))
print("done")
"""


def test_pool_workers_die_on_sigterm_under_the_cli_handler():
    """The CLI turns SIGTERM into an exception; forked pool workers (image decoding, FFCV) must not
    inherit that, or Pool.terminate() can leave a worker holding the task queue's lock and the
    build hangs. Workers get the default SIGTERM back, pools shut down cleanly, nothing printed."""
    proc = subprocess.run([sys.executable, "-c", POOL_AFTER_SIGTERM_HANDLER], capture_output=True, text=True,
                          timeout=120, env=cli_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]
    assert "Terminated" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_interrupted_multi_split_build_completes(tmp_path, capsys):
    src = tmp_path / "src"
    write_cifar10(src, class_images(100, 10, 32, seed=1), class_images(50, 10, 32, seed=2))
    out = tmp_path / "b"
    assert main(["build", "cifar10", "--src", str(src), "--out", str(out)]) == 0
    train_manifest = manifest_path(out / "cifar10_train.beton").read_text()
    (out / "cifar10_test.beton").unlink()  # as a kill between the two splits leaves it
    manifest_path(out / "cifar10_test.beton").unlink()
    capsys.readouterr()
    assert main(["build", "cifar10", "--src", str(src), "--out", str(out)]) == 0
    assert "already built from the same source" in capsys.readouterr().err
    assert BetonFile.open(out / "cifar10_test.beton").n == 50
    assert manifest_path(out / "cifar10_train.beton").read_text() == train_manifest  # kept, not rewritten
    other = tmp_path / "other"
    write_cifar10(other, class_images(100, 10, 32, seed=5), class_images(50, 10, 32, seed=2))
    (out / "cifar10_test.beton").unlink()
    assert main(["build", "cifar10", "--src", str(other), "--out", str(out)]) == 2
    assert "other content" in capsys.readouterr().err


# --- eval, early checks ------------------------------------------------------------------------------


def test_eval_refuses_an_unfinished_selection(finished_run, engine_data, tmp_path, capsys):
    sel = json.loads((finished_run / "selected_indices.json").read_text())
    sel.update(idx_selected=sel["idx_selected"][:60], phases_done=1, complete=False)
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(sel))
    args = ["eval", "--pool", str(engine_data["pool"]), "--test", str(engine_data["test"]), "--distilled",
            str(engine_data["distilled"]), "--teacher", str(engine_data["teacher"]), "--eval-model", "convnet_small",
            "--selection", str(path), "--epochs", "1", "--num-eval", "1", "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    one_line_error(capsys.readouterr().err, "unfinished run's selection", "--allow-incomplete", "--resume")
    assert main([*args, "--allow-incomplete"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ipc"] == 20 and sum(result["images_per_class"]) == 60 + 4 * 10
    assert result["images_per_class_max"] < 20  # what it really trained on, not the ipc it was meant for


def test_bad_statistics_and_non_finite_teacher(engine_data, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(engine_data["pool"], bad / "pool.beton")
    manifest = json.loads(manifest_path(engine_data["pool"]).read_text())
    manifest["std"] = [0.0, 0.2, 0.2]
    manifest_path(bad / "pool.beton").write_text(json.dumps(manifest))
    assert main(run_args({**engine_data, "pool": bad / "pool.beton"}, tmp_path / "o1")) == 2
    one_line_error(capsys.readouterr().err, "std > 0")
    ckpt = torch.load(engine_data["teacher"], weights_only=True)
    ckpt["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "nan.pt")
    assert main(run_args({**engine_data, "teacher": tmp_path / "nan.pt"}, tmp_path / "o2")) == 2
    one_line_error(capsys.readouterr().err, "non-finite logits on 64 of 64")  # the lazy pass's first probe
    assert not (tmp_path / "o2" / "phase1_candidates.npz").exists()  # before any curriculum
    assert main(run_args({**engine_data, "teacher": tmp_path / "nan.pt"}, tmp_path / "o3", "--teacher-pass",
                         "full")) == 2
    one_line_error(capsys.readouterr().err, "non-finite logits on 800 of 800")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_teacher_output_checked_before_training(engine_data, tmp_path, capsys, monkeypatch):
    nested = tmp_path / "new" / "folder" / "t.pt"  # parents are created
    args = ["teacher", "--pool", str(engine_data["pool"]), "--test", str(engine_data["test"]), "--model",
            "convnet_tiny", "--epochs", "1"]
    assert main([*args, "--output", str(nested)]) == 0 and nested.is_file()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    import ccfs_fast.runs.teacher

    trained = []
    monkeypatch.setattr(ccfs_fast.runs.teacher, "train_supervised", lambda *a, **k: trained.append(1))
    assert main([*args, "--output", str(blocker / "t.pt")]) == 2
    one_line_error(capsys.readouterr().err, "cannot write there")
    assert trained == []  # refused before any training


@pytest.fixture
def small_mount(tmp_path):
    """A tmpfs of its own (root only), unmounted afterwards."""
    if not ROOT:
        pytest.skip("mounting a small file system needs root")
    where = tmp_path / "mnt"
    where.mkdir()
    mounted = []

    def mount(*options: str) -> Path:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)]).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(where)
        return where

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)])


def test_read_only_places_give_one_line(engine_data, small_mount, capsys, big_arrays):
    ro = small_mount("ro", "size=1m")
    assert main(run_args(engine_data, ro / "run")) == 2
    one_line_error(capsys.readouterr().err, "Read-only file system")
    assert main(["teacher", "--pool", str(engine_data["pool"]), "--test", str(engine_data["test"]),
                 "--output", str(ro / "t.pt")]) == 2
    one_line_error(capsys.readouterr().err, "cannot write there")
    assert main(["build", "arrays", "--src", str(big_arrays), "--out", str(ro / "b.beton")]) == 2
    one_line_error(capsys.readouterr().err, f"cannot write {ro / 'b.beton'}: Read-only file system")


def test_disk_full_then_resume(engine_data, finished_run, small_mount, capsys):
    """A run that fills its disk stops with one line; after space is freed, --resume finishes it."""
    sizes = {p.name: p.stat().st_size for p in finished_run.iterdir() if p.is_file()}
    pages = sum(-(-size // 4096) * 4096 for name, size in sizes.items() if name != "report.png")
    mnt = small_mount(f"size={pages + 4 * 4096 + sizes['report.png'] // 2}")
    filler = mnt / "filler"
    out = mnt / "run"
    filler.write_bytes(b"\0" * 8192)
    assert main(run_args(engine_data, out)) == 2
    one_line_error(capsys.readouterr().err, "No space left on device", "--resume")
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
    assert main(run_args(engine_data, out, "--resume")) == 0
    assert (out / "report.png").is_file()
    assert json.loads((out / "selected_indices.json").read_text())["idx_selected"] == json.loads(
        (finished_run / "selected_indices.json").read_text())["idx_selected"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_a_pool_changed_in_place_is_named_not_blamed_on_the_cache(engine_data, finished_run, tmp_path, capsys):
    """A pool .beton overwritten in place after it was checked, its size and modification time kept (so
    its remembered digest still applies): the teacher disagrees with the (sound, signed) cached pass,
    and the run names the pool as the file that changed instead of recomputing the cache and training
    on it."""
    pool = tmp_path / "pool.beton"
    for suffix in ("", ".json", ".rows.npz"):
        shutil.copy(f"{engine_data['pool']}{suffix}", f"{pool}{suffix}")
    BetonFile.open(pool)  # checked once: its digest is remembered for this file as it is
    stat = os.stat(pool)
    from beton_builder.ffcv_import import Reader

    table = Reader(str(pool)).alloc_table
    with open(pool, "r+b") as fh:  # every image's pixels inverted, in place (FFCV's allocations)
        for ptr, size in zip(table["ptr"].tolist(), table["size"].tolist()):
            fh.seek(ptr)
            pixels = np.frombuffer(fh.read(size), np.uint8)
            fh.seek(ptr)
            fh.write((255 - pixels).tobytes())
    os.utime(pool, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    assert main(run_args({**engine_data, "pool": pool}, tmp_path / "run", "--num-eval", "0")) == 2
    one_line_error(capsys.readouterr().err, str(pool), "no longer matches its manifest", "modification time kept")
