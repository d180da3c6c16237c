"""The lazy coarse pass (ccfs_fast.selection.coarse) selects exactly what the full pass selects, from no more
predictions: generated problems (hypothesis) and the real published score files with real labels."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import PUBLISHED_SCORES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beton_builder.base.errors import SelectionError
from ccfs_fast.runs.phase import first_round_rate
from ccfs_fast.selection import coarse
from ccfs_fast.selection.coarse import PassState, bucket_rates, coarse_pass, record_chunk
from ccfs_fast.selection.kernels import candidate_mask, order_key, select_per_class
from ccfs_fast.selection.scores import easy_first_key


def both_passes(labels, okey, teacher_ok, selected, filter_pred, num_classes, curpc, balance, shortfall,
                misclassified, min_chunk=64, rate=None):
    """(full selection, lazy selection, full pass result, lazy pass result, the images the lazy
    teacher pass asked about); a selection is strict's message where `strict` raised. The lazy
    teacher pass (gated_pass) must select what the full pass selects."""
    eligible = teacher_ok & ~selected
    calls = []

    def predict(indices):
        calls.append(len(indices))
        return indices, filter_pred[indices], np.zeros(len(indices), np.float32)

    out = []
    for mode in ("full", "lazy"):
        result = coarse_pass(mode, eligible, labels, okey, num_classes, curpc, balance, misclassified, predict,
                             rate, min_chunk)
        pred = np.full(len(labels), -1)
        pred[result.index] = result.pred
        candidates = candidate_mask(teacher_ok, selected, pred, labels, misclassified)
        try:
            out.append(select_per_class(candidates, labels, num_classes, okey, curpc, balance, shortfall, eligible))
        except SelectionError as exc:
            out.append(str(exc))
        out.append(result)
    assert sum(calls) == out[1].predicted + out[3].predicted  # every prediction is in the audit
    gated = gated_pass(labels, okey, teacher_ok, selected, filter_pred, num_classes, curpc, balance, shortfall,
                       misclassified, min_chunk, rate)
    if isinstance(out[0], str):
        assert gated[0] == out[0]  # strict: the same error
    else:
        assert gated[0].indices.tolist() == out[0].indices.tolist()  # the full pass's selection, in order
        assert gated[0].filled_per_class.tolist() == out[0].filled_per_class.tolist()
    return out[0], out[2], out[1], out[3], gated[2]


def gated_pass(labels, okey, teacher_ok, selected, filter_pred, num_classes, curpc, balance, shortfall,
               misclassified, min_chunk, rate):
    """The lazy pass with the teacher as its gate (the lazy teacher pass): it walks every unselected
    image and learns teacher_ok only for the images it reaches; the filter predicts only those the
    teacher classifies correctly; fill draws from the teacher-correct images it learnt about. Returns
    (selection or strict's message, pass result, images the teacher was asked about)."""
    asked = np.zeros(len(labels), int)

    def gate(indices):
        asked[indices] += 1
        return teacher_ok[indices]

    def predict(indices):
        assert teacher_ok[indices].all()  # the filter never sees an image the teacher got wrong
        return indices, filter_pred[indices], np.zeros(len(indices), np.float32)

    result = coarse_pass("lazy", ~selected, labels, okey, num_classes, curpc, balance, misclassified, predict, rate,
                         min_chunk, gate=gate)
    assert asked.max(initial=0) <= 1 and not asked[selected].any()  # each unselected image asked once at most
    known_ok = teacher_ok & (asked > 0)
    pred = np.full(len(labels), -1)
    pred[result.index] = result.pred
    candidates = candidate_mask(known_ok, selected, pred, labels, misclassified)
    try:
        chosen = select_per_class(candidates, labels, num_classes, okey, curpc, balance, shortfall,
                                  known_ok & ~selected)
    except SelectionError as exc:
        chosen = str(exc)
    assert result.eligible == int((known_ok & ~selected).sum())
    return chosen, result, asked > 0


def check_lazy(full, lazy, full_pass, lazy_pass, labels, okey, eligible):
    if isinstance(full, str) or isinstance(lazy, str):
        assert full == lazy  # strict: the same error, naming the same class
        return
    assert lazy.indices.tolist() == full.indices.tolist()          # same images, same order
    assert lazy.filled_per_class.tolist() == full.filled_per_class.tolist()
    # candidates are survivors among predicted images: never more than the full pass found
    assert (lazy.candidates_per_class <= full.candidates_per_class).all()
    assert lazy_pass.predicted <= full_pass.predicted == eligible.sum()
    assert len(np.unique(lazy_pass.index)) == lazy_pass.predicted   # nothing predicted twice
    # The README's re-check: the selection lies within the predicted images, and every unpredicted
    # eligible image of a class ranks after that class's last selected image.
    predicted = np.zeros(len(labels), bool)
    predicted[lazy_pass.index] = True
    assert predicted[lazy.indices].all()
    for c in np.unique(labels[lazy.indices]):
        mine = lazy.indices[labels[lazy.indices] == c]
        last = max(zip(okey[mine], mine))
        for i in np.flatnonzero(eligible & ~predicted & (labels == c)):
            assert (okey[i], i) > last


@st.composite
def problems(draw):
    n = draw(st.integers(10, 300))
    num_classes = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    ties = draw(st.booleans())
    scores = rng.integers(0, 5, n).astype(np.float64) if ties else rng.random(n)
    method = draw(st.sampled_from(["simple", "hard", "random"]))
    okey = order_key(method, easy_first_key(scores, draw(st.sampled_from(["forgetting", "cscore"]))), seed)
    teacher_ok = rng.random(n) < draw(st.floats(0.3, 1.0))
    selected = (rng.random(n) < draw(st.floats(0.0, 0.3))) & teacher_ok
    miss = rng.choice([0.0, 0.05, 0.3, 0.9, 1.0], num_classes)  # some classes run out
    filter_pred = np.where(rng.random(n) < miss[labels], (labels + 1) % max(num_classes, 2), labels)
    return dict(labels=labels, okey=okey, teacher_ok=teacher_ok, selected=selected, filter_pred=filter_pred,
                num_classes=num_classes, curpc=draw(st.integers(1, 12)), balance=draw(st.booleans()),
                shortfall=draw(st.sampled_from(["fill", "strict", "short"])), misclassified=draw(st.booleans()),
                min_chunk=draw(st.integers(1, 40)), rate=draw(st.sampled_from([None, 0.01, 0.3, 1.0])))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_lazy_equals_full_on_generated_problems(p):
    full, lazy, full_pass, lazy_pass, _ = both_passes(**p)
    check_lazy(full, lazy, full_pass, lazy_pass, p["labels"], p["okey"], p["teacher_ok"] & ~p["selected"])


def _published(name):
    path = PUBLISHED_SCORES / name
    if name.endswith(".npz"):
        with np.load(path) as npz:
            return npz["scores"].astype(np.float64), npz["labels"].astype(np.int64), "cscore"
    scores = np.load(path).astype(np.float64)
    if "CIFAR" in name:
        with np.load(PUBLISHED_SCORES / name.replace("forgetting_", "cscores_").replace(".npy", ".npz")) as npz:
            return scores, npz["labels"].astype(np.int64), "forgetting"
    return scores, np.repeat(np.arange(200), 500), "forgetting"  # Tiny-ImageNet: sorted wnids, 500 each


@pytest.mark.parametrize("name,method,balance,shortfall,miss_rate,teacher_share", [
    ("forgetting_CIFAR10.npy", "simple", True, "fill", 0.1, 0.2),
    ("forgetting_CIFAR100.npy", "hard", True, "short", 0.05, 0.95),
    ("cscores_CIFAR10.npz", "random", False, "fill", 0.2, 0.2),
    ("cscores_CIFAR100.npz", "simple", True, "strict", 0.3, None),
    ("forgetting_Tiny.npy", "simple", True, "fill", 0.02, None),
])
def test_lazy_equals_full_on_published_scores(name, method, balance, shortfall, miss_rate, teacher_share):
    """Three phases on the real files and labels, a filter that misclassifies `miss_rate` of the
    images (and nothing of class 3, which then runs out under misclassified selection); the lazy
    teacher pass selects the same and, memoised across phases, predicts at most `teacher_share` of
    the pool (None: no bound; a rare miss over many classes needs nearly all of it, 14 survivors of
    200 classes at 2%)."""
    scores, labels, kind = _published(name)
    num_classes = int(labels.max()) + 1
    rng = np.random.default_rng(0)
    n = len(labels)
    teacher_ok = rng.random(n) < 0.9
    selected = np.zeros(n, bool)
    predicted_total = eligible_total = 0
    asked = np.zeros(n, bool)
    for phase, curpc in enumerate([14, 13, 13], 1):
        okey = order_key(method, easy_first_key(scores, kind), phase)
        wrong = (rng.random(n) < miss_rate) & (labels != 3)
        filter_pred = np.where(wrong, (labels + 1) % num_classes, labels)
        full, lazy, full_pass, lazy_pass, reached = both_passes(labels, okey, teacher_ok, selected, filter_pred,
                                                                num_classes, curpc, balance, shortfall, True, 1024, 0.1)
        check_lazy(full, lazy, full_pass, lazy_pass, labels, okey, teacher_ok & ~selected)
        asked |= reached
        if isinstance(full, str):
            assert "class 3" in full  # strict names the class that ran out
            return
        selected[full.indices] = True
        predicted_total += lazy_pass.predicted
        eligible_total += full_pass.predicted
    assert predicted_total < eligible_total  # strictly fewer predictions than the full pass
    if teacher_share is not None:
        assert asked.sum() <= teacher_share * n


def _misclassifying_filter(classes: int = 10, per_class: int = 500, miss: float = 0.9, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    okey = rng.random(len(labels))
    pred = np.where(rng.random(len(labels)) < miss, (labels + 1) % classes, labels)
    return labels, okey, pred


def _lazy(labels, okey, pred, curpc, rate, min_chunk=64, misclassified=True):
    eligible = np.ones(len(labels), bool)
    return coarse_pass("lazy", eligible, labels, okey, int(labels.max()) + 1, curpc, True, misclassified,
                       lambda idx: (idx, pred[idx], np.zeros(len(idx), np.float32)), rate, min_chunk)


def test_first_round_sized_by_the_rate_fills_the_classes():
    """A filter wrong on 90% of the pool, 20 per class needed: planned with that rate (phase 1 takes
    it from the filter's test error) the pass predicts about 20 / 0.9 x 1.25 per class in one round;
    planned with the default guess (25%) it predicts 4x more for the same selection."""
    labels, okey, pred = _misclassifying_filter()
    informed, blind = _lazy(labels, okey, pred, 20, 0.9), _lazy(labels, okey, pred, 20, None)
    assert informed.rounds == 1 and 200 <= informed.predicted <= 10 * 29
    assert blind.predicted >= 3 * informed.predicted
    assert first_round_rate(None, 10.0, True) == pytest.approx(0.9)    # 10% test accuracy: 90% survive
    assert first_round_rate(None, 10.0, False) == pytest.approx(0.1)   # correctly classified kept
    assert first_round_rate(0.3, 10.0, True) == 0.3                    # later phases: the previous rate
    assert first_round_rate(None, None, True) is None


def test_rare_survivor_class_is_planned_by_its_own_rate(monkeypatch):
    """Nine classes where half the images survive and one where 1 in 100 does: the bucket's own
    rate (bucket_rates) grows its rounds geometrically instead of planning it at the overall rate."""
    labels, okey, pred = _misclassifying_filter(miss=0.5)
    rare = np.flatnonzero(labels == 4)
    pred[rare] = np.where(np.random.default_rng(1).random(len(rare)) < 0.01, 5, 4)
    state = PassState([np.arange(10), np.arange(10, 20)], need=3)
    record_chunk(state, np.array([0] * 10 + [1] * 10), np.array([False] * 10 + [True] * 5 + [False] * 5))
    rates = bucket_rates(state, np.array([0, 1]), 0.25)
    assert rates[0] == pytest.approx((0 + 10 * 0.25) / 20)
    assert rates[1] == pytest.approx((5 + 10 * 0.25) / 20)
    own = _lazy(labels, okey, pred, 3, 0.5, min_chunk=1)
    monkeypatch.setattr(coarse, "PRIOR_IMAGES", 10 ** 9)  # every bucket planned at the overall rate
    overall = _lazy(labels, okey, pred, 3, 0.5, min_chunk=1)
    assert own.rounds <= 8 and overall.rounds >= 3 * own.rounds
