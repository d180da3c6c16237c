"""Score files: loading and validation; selection on the real published CCFS score files."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
from conftest import PUBLISHED_SCORES
from select_reference import reference_select

from beton_builder.base.errors import ScoreError, UnknownNameError
from ccfs_fast.selection.kernels import candidate_mask, curriculum_arrangement, order_key, select_per_class
from ccfs_fast.selection.scores import base_names, easy_first_key, load_scores, score_kind


def test_npy_and_npz_load(tmp_path):
    labels = np.array([0, 1, 1, 0])
    np.save(tmp_path / "s.npy", np.array([0.2, 0.0, 1.0, 0.4], np.float32))
    np.testing.assert_allclose(load_scores(tmp_path / "s.npy", labels), [0.2, 0.0, 1.0, 0.4], rtol=1e-6)
    np.savez(tmp_path / "s.npz", scores=np.array([1.0, 2, 3, 4]), labels=labels)
    assert load_scores(tmp_path / "s.npz", labels).tolist() == [1, 2, 3, 4]


def test_wrong_length_names_both_sizes(tmp_path):
    np.save(tmp_path / "s.npy", np.zeros(49999))
    with pytest.raises(ScoreError, match="has 49999 values but the pool has 50000 images"):
        load_scores(tmp_path / "s.npy", np.zeros(50000, int))


def test_nan_and_label_mismatch(tmp_path):
    np.save(tmp_path / "n.npy", np.array([0.0, np.nan, 1.0, np.nan]))
    with pytest.raises(ScoreError, match="2 NaN values \\(first at index 1\\)"):
        load_scores(tmp_path / "n.npy", np.zeros(4, int))
    np.savez(tmp_path / "l.npz", scores=np.zeros(4), labels=np.array([0, 1, 2, 3]))
    with pytest.raises(ScoreError, match="first at index 2 \\(file 2, pool 5\\)"):
        load_scores(tmp_path / "l.npz", np.array([0, 1, 5, 3]))
    np.savez(tmp_path / "k.npz", values=np.zeros(4))
    with pytest.raises(ScoreError, match="expected 'scores'"):
        load_scores(tmp_path / "k.npz", np.zeros(4, int))
    (tmp_path / "t.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ScoreError, match="truncated or corrupt"):
        load_scores(tmp_path / "t.npy", np.zeros(4, int))


def test_directions_declared_once():
    assert score_kind("forgetting").easy_end == "low" and score_kind("cscore").easy_end == "high"
    assert easy_first_key(np.array([1.0, 2.0]), "cscore").tolist() == [-1.0, -2.0]
    with pytest.raises(UnknownNameError, match="cscore, forgetting, logits"):
        score_kind("el2n")


def _run_phases(labels, scores, kind, method, seed, num_classes, spc=40, phases=3):
    """Three curriculum phases with random filter predictions; kernel and reference side by side."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    teacher_correct = rng.random(n) < 0.95
    selected = np.zeros(n, bool)
    history = []
    for k, curpc in enumerate(curriculum_arrangement(spc, phases)):
        pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, num_classes, n))  # ~70% accurate filter
        cand = candidate_mask(teacher_correct, selected, pred, labels, True)
        res = select_per_class(cand, labels, num_classes, order_key(method, easy_first_key(scores, kind), seed + k),
                               curpc, True, "fill", teacher_correct & ~selected)
        expected = reference_select(np.flatnonzero(teacher_correct).tolist(), np.flatnonzero(selected).tolist(),
                                    pred, labels, num_classes, scores, kind, method, curpc, True, "fill",
                                    True, seed + k)
        assert res.indices.tolist() == expected
        picked = res.indices
        assert len(np.unique(picked)) == len(picked)                            # unique
        assert not selected[picked].any()                                       # disjoint from earlier phases
        assert teacher_correct[picked].all()                                    # teacher-correct only
        assert (np.bincount(labels[picked], minlength=num_classes) == curpc).all()  # exact budget
        selected[picked] = True
        history.append(picked)
    return history


@pytest.mark.parametrize("dataset,classes", [("CIFAR10", 10), ("CIFAR100", 100)])
@pytest.mark.parametrize("kind", ["forgetting", "cscore"])
def test_real_scores_selection_equals_reference(dataset, classes, kind):
    with np.load(PUBLISHED_SCORES / f"cscores_{dataset}.npz") as npz:
        labels = npz["labels"].astype(np.int64)
    assert len(labels) == 50000 and labels.max() == classes - 1
    path = PUBLISHED_SCORES / (f"forgetting_{dataset}.npy" if kind == "forgetting" else f"cscores_{dataset}.npz")
    scores = load_scores(path, labels)  # the .npz's labels are checked against the pool labels
    spc = 400 if classes == 10 else 40
    history = _run_phases(labels, scores, kind, "simple", seed=11, num_classes=classes, spc=spc)
    # The easy end really is taken: the mean score of picked images is easier than the pool's.
    picked = np.concatenate(history)
    easier = scores[picked].mean() < scores.mean() if kind == "forgetting" else scores[picked].mean() > scores.mean()
    assert easier


def test_real_tiny_forgetting_loads_and_hard_selection():
    scores = np.load(PUBLISHED_SCORES / "forgetting_Tiny.npy")
    labels = np.repeat(np.arange(200), 500)  # Tiny-ImageNet train: 500 images per sorted wnid
    loaded = load_scores(PUBLISHED_SCORES / "forgetting_Tiny.npy", labels)
    assert loaded.shape == (100000,) and np.array_equal(loaded, scores.astype(np.float64))
    _run_phases(labels, loaded, "forgetting", "hard", seed=3, num_classes=200, spc=30)


def test_cscores_labels_must_match_pool():
    with np.load(PUBLISHED_SCORES / "cscores_CIFAR10.npz") as npz:
        labels = npz["labels"].copy()
    labels[123] = (labels[123] + 1) % 10
    with pytest.raises(ScoreError, match="first at index 123"):
        load_scores(PUBLISHED_SCORES / "cscores_CIFAR10.npz", labels)


@pytest.mark.parametrize("values,needle", [
    (np.array([3, 0, 1, 2], np.int32), "holds int32 values; read exactly as float64"),
    (np.array([0.2, 0.0, 1.0, 0.4], np.float16), "holds float16 values"),
    (np.array([0.2, np.inf, -np.inf, np.inf], np.float32), "has 2 +inf and 1 -inf values (first at index 1)"),
])
def test_unusual_score_files_are_read_and_said(tmp_path, values, needle):
    """Integer, float16 and infinite scores are accepted, and one note says what was done with them;
    infinite values rank beyond every finite one."""
    np.save(tmp_path / "s.npy", values)
    notes: list[str] = []
    loaded = load_scores(tmp_path / "s.npy", np.zeros(4, int), notes)
    assert len(notes) == 1 and needle in notes[0] and str(tmp_path / "s.npy") in notes[0]
    assert loaded.dtype == np.float64 and loaded.tolist() == values.astype(np.float64).tolist()
    assert load_scores(tmp_path / "s.npy", np.zeros(4, int)).tolist() == loaded.tolist()  # notes optional
    clean: list[str] = []
    np.save(tmp_path / "f.npy", np.array([0.2, 0.0, 1.0, 0.4], np.float32))
    load_scores(tmp_path / "f.npy", np.zeros(4, int), clean)
    assert clean == []  # float32 / float64 files (the published ones) say nothing


def test_published_files_are_whole():
    """The five score files shipped in scores/ are byte for byte the published ones (SHA256SUMS)."""
    import hashlib

    listed = dict(line.split()[::-1] for line in (PUBLISHED_SCORES / "SHA256SUMS").read_text().splitlines())
    assert sorted(listed) == ["cscores_CIFAR10.npz", "cscores_CIFAR100.npz", "forgetting_CIFAR10.npy",
                              "forgetting_CIFAR100.npy", "forgetting_Tiny.npy"]
    for name, digest in listed.items():
        assert hashlib.sha256((PUBLISHED_SCORES / name).read_bytes()).hexdigest() == digest, name


def test_presets_use_the_published_scores():
    from ccfs_fast.runs.presets import published_scores

    values, notes = published_scores("cifar100-ipc50", {})
    assert values["score_path"] == PUBLISHED_SCORES / "forgetting_CIFAR100.npy" and "no --score-path" in notes[0]
    assert published_scores("tiny-imagenet-ipc50", {})[0]["score_path"].name == "forgetting_Tiny.npy"
    mine = {"score_path": "mine.npy"}
    assert published_scores("cifar10-ipc500", mine) == (mine, [])  # an explicit file wins
    assert published_scores("cifar10-ipc500", {"score": "cscore"}) == ({"score": "cscore"}, [])
    assert published_scores(None, {}) == ({}, [])


def test_base_names_of_str_and_bytes_with_and_without_folders(tmp_path):
    """Base names as UTF-8 bytes, whatever the stored form: ASCII and non-ASCII str, bytes, with
    folders or without, empty; and a score file whose names are str (not bytes) with non-ASCII
    names aligns to a pool whose names carry folders."""
    names = np.array(["n01440764/n01440764_10026.JPEG", "n0/ü_é.JPEG", "plain.jpg", "a/b/c.png", ""])
    expected = [b"n01440764_10026.JPEG", "ü_é.JPEG".encode(), b"plain.jpg", b"c.png", b""]
    assert base_names(names).tolist() == expected
    assert base_names(names[[0, 2, 3]]).tolist() == [expected[0], expected[2], expected[3]]  # ASCII only
    assert base_names(np.char.encode(names, "utf-8")).tolist() == expected
    assert base_names(np.array([], str)).shape == (0,)
    pool = np.array(["w1/ü1.JPEG", "w1/a2.JPEG", "w2/b3.JPEG"])
    scores, labels = np.array([0.3, 0.1, 0.2]), np.array([0, 0, 1])
    order = np.array([2, 0, 1])
    path = tmp_path / "named.npz"
    np.savez(path, filenames=np.array(["b3.JPEG", "ü1.JPEG", "a2.JPEG"]), labels=labels[order], scores=scores[order])
    assert np.array_equal(load_scores(path, labels, None, lambda: pool), scores)


POOL_NAMES = np.array([f"n0144{c}/n0144{c}_{k}.JPEG" for c in range(3) for k in range(4)])


@pytest.mark.parametrize("dtype", ["S", "U", "object-bytes", "object-str"])
def test_name_keyed_files_load_whatever_dtype_holds_the_names(tmp_path, dtype):
    """The published ImageNet files store their names as object arrays of bytes (np.savez of
    np.array(names, dtype=object)); fixed-width bytes and unicode and object arrays of str load too,
    all to the same aligned scores, without a general unpickle."""
    labels = np.repeat(np.arange(3), 4)
    base = np.array([n.split("/")[-1] for n in POOL_NAMES])
    perm = np.random.default_rng(0).permutation(12)
    names = {"S": base.astype(bytes), "U": base, "object-bytes": np.array([n.encode() for n in base], dtype=object),
             "object-str": np.array(list(base), dtype=object)}[dtype][perm]
    scores = np.linspace(0, 1, 12)
    np.savez(tmp_path / "c.npz", filenames=names, labels=labels[perm], scores=scores[perm])
    aligned = load_scores(tmp_path / "c.npz", labels, [], lambda: POOL_NAMES)
    np.testing.assert_array_equal(aligned, scores)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    """An .npz whose `filenames` member is a pickle calling os.system: one ScoreError naming the
    refused global; the command never runs."""
    marker = tmp_path / "ran"
    with zipfile.ZipFile(tmp_path / "evil.npz", "w") as archive:
        for key, array in (("scores", np.zeros(12)), ("labels", np.repeat(np.arange(3), 4))):
            buf = io.BytesIO()
            np.save(buf, array)
            archive.writestr(f"{key}.npy", buf.getvalue())
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (12,)})
        pickle.dump(_Payload(str(marker)), buf, protocol=3)
        archive.writestr("filenames.npy", buf.getvalue())
    with pytest.raises(ScoreError, match=r"holds a pickled object other than an array of names \(posix.system\)"):
        load_scores(tmp_path / "evil.npz", np.repeat(np.arange(3), 4), [], lambda: POOL_NAMES)
    assert not marker.exists()


def test_a_score_file_of_another_kind_is_refused(tmp_path):
    """Layouts that name their kind (c-scores keyed by file name, memorization estimates) and the
    published files shipped in scores/ are refused under another --score (their easy ends may be
    opposite), in one line naming what the file holds; a bare array or plain `scores` is any kind."""
    from ccfs_fast.selection.scores import check_score_kind

    np.savez(tmp_path / "c.npz", filenames=np.array([b"a"]), labels=np.zeros(1, int), scores=np.zeros(1))
    np.savez(tmp_path / "m.npz", tr_filenames=np.array([b"a"]), tr_labels=np.zeros(1, int), tr_mem=np.zeros(1))
    np.save(tmp_path / "f.npy", np.zeros(1))
    with pytest.raises(ScoreError, match=r"holds consistency score .*\(cscore: high = easy\), but --score is "
                                         r"memorization \(low = easy\); pass --score cscore"):
        check_score_kind("memorization", tmp_path / "c.npz")
    with pytest.raises(ScoreError, match="holds memorization estimate .* but --score is cscore"):
        check_score_kind("cscore", tmp_path / "m.npz")
    with pytest.raises(ScoreError, match="pass --score cscore"):  # a published file, known by its digest
        check_score_kind("forgetting", PUBLISHED_SCORES / "cscores_CIFAR10.npz")
    np.savez(tmp_path / "plain.npz", scores=np.zeros(1), labels=np.zeros(1, int))  # the generic layout
    for kind in ("forgetting", "cscore", "memorization"):
        check_score_kind(kind, tmp_path / "f.npy")
        check_score_kind(kind, tmp_path / "plain.npz")
    check_score_kind("cscore", tmp_path / "c.npz")
    check_score_kind("forgetting", PUBLISHED_SCORES / "forgetting_CIFAR10.npy")


def test_a_run_is_warned_when_most_scores_tie(tmp_path):
    """55% zeros (a short teacher's forgetting scores): one warning that the fine stage then picks by
    pool index; 45% zeros and the published files say nothing."""
    rng = np.random.default_rng(0)
    for zeros, warned in ((55, True), (45, False)):
        values = np.concatenate([np.zeros(zeros), rng.integers(1, 9, 100 - zeros)]).astype(np.float32)
        np.save(tmp_path / "s.npy", rng.permutation(values))
        notes: list[str] = []
        load_scores(tmp_path / "s.npy", np.zeros(100, int), notes)
        assert (notes != []) == warned, notes
        if warned:
            assert "55% of the scores (55 of 100) are 0" in notes[0] and "picks by pool index" in notes[0]
    labels = np.repeat(np.arange(10), 5000)
    published: list[str] = []
    load_scores(PUBLISHED_SCORES / "forgetting_CIFAR10.npy", labels, published)
    assert published == []
