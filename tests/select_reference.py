"""An independent reference of CCFS selection for the tests, written from docs/design.md §1 step 4 with
boolean masks and a stable lexicographic sort (not the paper's sets and sorts the benchmarks time):
candidates = teacher-correct, not selected, filter wrong (or right); per class (or globally) the first
curpc in (score key, pool index) order; a shortfall filled from the class's other teacher-correct
images in the same order, refused (`strict`) or left (`short`)."""
from __future__ import annotations

import numpy as np


class ReferenceShortfall(Exception):
    pass


def _order(scores, kind: str, method: str, seed: int, n: int) -> np.ndarray:
    """Pool indices in selection order: by the key (easy first for simple, hard first for hard, a
    seeded uniform draw for random), ties by ascending index."""
    if method == "random":
        key = np.random.default_rng(seed).random(n)
    else:
        easy_is_high = kind in ("cscore", "logits")
        key = np.asarray(scores, np.float64) * (-1.0 if easy_is_high != (method == "hard") else 1.0)
    return np.lexsort((np.arange(n), key))


def reference_select(teacher_correct_idx, selected_idx, filter_pred, labels, num_classes, scores, kind,
                     method, curpc, balance, shortfall, misclassified=True, seed=0) -> list[int]:
    labels = np.asarray(labels)
    n = len(labels)
    usable = np.zeros(n, bool)
    usable[np.asarray(list(teacher_correct_idx), np.int64)] = True
    usable[np.asarray(list(selected_idx), np.int64)] = False
    wrong = np.asarray(filter_pred) != labels
    candidate = usable & (wrong if misclassified else ~wrong)
    order = _order(scores, kind, method, seed, n)
    groups = [labels[order] == c for c in range(num_classes)] if balance else [np.ones(n, bool)]
    budget = curpc if balance else curpc * num_classes
    picked: list[int] = []
    for in_group in groups:
        ranked = order[in_group]
        take = ranked[candidate[ranked]][:budget].tolist()
        if len(take) < budget and shortfall == "strict":
            raise ReferenceShortfall
        if len(take) < budget and shortfall == "fill":
            spare = ranked[usable[ranked] & ~candidate[ranked]]
            take += spare[:budget - len(take)].tolist()
        picked += take
    return picked
