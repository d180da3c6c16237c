"""CCFS selection the way the paper's code does it (the filter's misclassified indices from one
vectorised comparison, Python sets for the intersections, a loop that buckets by class, per-class
`sorted` with a key lambda), plus the documented tie rule (ascending pool index) and shortfall
policies: the baseline the benchmarks time the numba kernels against (the tests hold the kernels
against an independent reference of their own, tests/select_reference.py)."""
from __future__ import annotations

import numpy as np


class ReferenceShortfall(Exception):
    pass


def reference_key(scores, kind: str, method: str, seed: int):
    """Sort key per pool index, smaller first: the paper's direction per score kind."""
    if method == "random":
        draws = np.random.default_rng(seed).random(len(scores)).tolist()
        return lambda i: (draws[i], i)
    easy_high = kind in ("cscore", "logits")
    hard = method == "hard"
    sign = -1.0 if easy_high != hard else 1.0  # easy-high & simple -> descending; etc.
    values = [float(v) for v in scores]
    return lambda i: (sign * values[i], i)


def reference_select(teacher_correct_idx, selected_idx, filter_pred, labels, num_classes, scores, kind,
                     method, curpc, balance, shortfall, misclassified=True, seed=0):
    labels_np, preds = np.asarray(labels), np.asarray(filter_pred)
    target = np.flatnonzero((preds != labels_np) == misclassified).tolist()  # the paper's torch.where
    labels = labels_np.tolist()
    target = set(teacher_correct_idx) & set(target) - set(selected_idx)
    spare = set(teacher_correct_idx) - set(selected_idx) - target
    key = reference_key(scores, kind, method, seed)
    if balance:
        per_class = [[] for _ in range(num_classes)]
        for idx in target:
            per_class[labels[idx]].append(idx)
        spare_per_class = [[] for _ in range(num_classes)]
        for idx in spare:
            spare_per_class[labels[idx]].append(idx)
        selection = []
        for c in range(num_classes):
            take = sorted(per_class[c], key=key)[:curpc]
            selection += _top_up(take, curpc, spare_per_class[c], key, shortfall)
        return selection
    take = sorted(target, key=key)[:curpc * num_classes]
    return _top_up(take, curpc * num_classes, list(spare), key, shortfall)


def _top_up(take, budget, spare, key, shortfall):
    if len(take) >= budget or shortfall == "short":
        return take
    if shortfall == "strict":
        raise ReferenceShortfall
    return take + sorted(spare, key=key)[:budget - len(take)]
