"""Selection kernels against the plain-Python reference; arrangement; candidate mask."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from select_reference import ReferenceShortfall, reference_select

from beton_builder.base.errors import ConfigError, SelectionError, UnknownNameError
from ccfs_fast.selection.kernels import candidate_mask, curriculum_arrangement, order_key, select_per_class
from ccfs_fast.selection.scores import easy_first_key


def kernel_select(teacher_correct_idx, selected_idx, filter_pred, labels, num_classes, scores, kind, method,
                  curpc, balance, shortfall, misclassified=True, seed=0):
    n = len(labels)
    teacher_correct = np.zeros(n, bool)
    teacher_correct[teacher_correct_idx] = True
    selected = np.zeros(n, bool)
    selected[selected_idx] = True
    cand = candidate_mask(teacher_correct, selected, np.asarray(filter_pred), np.asarray(labels), misclassified)
    key = order_key(method, easy_first_key(scores, kind), seed)
    return select_per_class(cand, np.asarray(labels), num_classes, key, curpc, balance, shortfall,
                            fill_pool=teacher_correct & ~selected)


def test_arrangement():
    assert curriculum_arrangement(40, 3) == [14, 13, 13]
    assert curriculum_arrangement(400, 3) == [134, 133, 133]
    assert curriculum_arrangement(5, 5) == [1] * 5
    with pytest.raises(ConfigError, match="cannot fill 4 curricula"):
        curriculum_arrangement(3, 4)


def test_candidate_mask_variants():
    labels = np.array([0, 1, 2, 0, 1])
    pred = np.array([0, 2, 2, 1, -1])
    tc = np.array([True, True, True, True, False])
    sel = np.array([False, False, True, False, False])
    assert candidate_mask(tc, sel, pred, labels, True).tolist() == [False, True, False, True, False]
    assert candidate_mask(tc, sel, pred, labels, False).tolist() == [True, False, False, False, False]
    tc[4] = True  # eligible but not predicted (-1): never a coarse survivor, whichever side is kept
    assert candidate_mask(tc, sel, pred, labels, True).tolist() == [False, True, False, True, False]
    assert candidate_mask(tc, sel, pred, labels, False).tolist() == [True, False, False, False, False]


problem = st.integers(1, 6).flatmap(lambda c: st.tuples(
    st.just(c),
    st.integers(0, 120).flatmap(lambda n: st.tuples(
        st.lists(st.integers(0, c - 1), min_size=n, max_size=n),           # labels
        st.lists(st.integers(0, c - 1), min_size=n, max_size=n),           # filter predictions
        st.lists(st.integers(0, 6), min_size=n, max_size=n),               # scores (x0.2: many ties)
        st.lists(st.booleans(), min_size=n, max_size=n),                   # teacher correct
        st.lists(st.integers(0, 9), min_size=n, max_size=n),               # 0 -> already selected
    )),
    st.integers(1, 30),                                                    # curpc (may exceed pool)
    st.sampled_from(["simple", "hard", "random"]),
    st.booleans(),                                                         # balance
    st.sampled_from(["fill", "strict", "short"]),
    st.booleans(),                                                         # misclassified
    st.sampled_from(["forgetting", "cscore", "logits"]),
    st.integers(0, 2**31 - 1),                                             # seed
))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem)
def test_kernel_equals_reference(case):
    c, (labels, preds, raw, tc, sel), curpc, method, balance, shortfall, miscls, kind, seed = case
    scores = np.array(raw, float) * 0.2
    tc_idx = [i for i, v in enumerate(tc) if v]
    sel_idx = [i for i, v in enumerate(sel) if v == 0]
    args = (tc_idx, sel_idx, preds, labels, c, scores, kind, method, curpc, balance, shortfall, miscls, seed)
    try:
        expected = reference_select(*args)
    except ReferenceShortfall:
        with pytest.raises(SelectionError):
            kernel_select(*args)
        return
    got = kernel_select(*args)
    assert got.indices.tolist() == expected
    assert got.budget == curpc * c and got.unmet == curpc * c - len(expected)
    np.testing.assert_array_equal(got.selected_per_class, np.bincount(np.array(labels, int)[expected], minlength=c)
                                  if expected else np.zeros(c, int))


def test_fill_tops_up_short_class_by_score_and_reports_it():
    labels = np.array([0] * 6 + [1] * 6)
    scores = np.array([5, 4, 3, 2, 1, 0, 5, 4, 3, 2, 1, 0], float)  # forgetting: low = easy
    cand = np.zeros(12, bool)
    cand[[0, 1, 6, 7, 8, 9]] = True  # class 0 has 2 candidates, class 1 has 4
    fill_pool = np.ones(12, bool)
    key = order_key("simple", easy_first_key(scores, "forgetting"), 0)
    res = select_per_class(cand, labels, 2, key, 3, True, "fill", fill_pool)
    # class 0: candidates 1, 0 (easiest first), then the easiest non-candidate, 5; class 1: 9, 8, 7.
    assert res.indices.tolist() == [1, 0, 5, 9, 8, 7]
    assert res.candidates_per_class.tolist() == [2, 4]
    assert res.filled_per_class.tolist() == [1, 0] and res.unmet == 0
    short = select_per_class(cand, labels, 2, key, 3, True, "short", fill_pool)
    assert short.indices.tolist() == [1, 0, 9, 8, 7] and short.unmet == 1
    with pytest.raises(SelectionError, match="class 0 has 2 candidates but 3 images"):
        select_per_class(cand, labels, 2, key, 3, True, "strict", fill_pool)


def test_unknown_names_list_valid_ones():
    with pytest.raises(UnknownNameError, match="valid selection methods: hard, random, simple"):
        order_key("easy", np.zeros(3), 0)
    with pytest.raises(UnknownNameError, match="fill, short, strict"):
        select_per_class(np.ones(2, bool), np.zeros(2, int), 1, np.zeros(2), 1, shortfall="topup")


def test_random_is_seeded_and_uniform():
    n = 2000
    labels = np.zeros(n, int)
    cand = np.ones(n, bool)
    a = select_per_class(cand, labels, 1, order_key("random", np.zeros(n), 7), 100)
    b = select_per_class(cand, labels, 1, order_key("random", np.zeros(n), 7), 100)
    c = select_per_class(cand, labels, 1, order_key("random", np.zeros(n), 8), 100)
    assert a.indices.tolist() == b.indices.tolist() != c.indices.tolist()
    counts = np.zeros(n)
    for seed in range(300):
        counts[select_per_class(cand, labels, 1, order_key("random", np.zeros(n), seed), 100).indices] += 1
    # Each index is picked with probability 0.05: 15 expected over 300 draws; halves must agree.
    assert abs(counts[: n // 2].mean() - counts[n // 2:].mean()) < 1.5
