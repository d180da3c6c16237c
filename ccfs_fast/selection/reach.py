"""How complete a selection is: the real images per class it reached against its target, and the
images its budget asked for that no curriculum could supply (pure functions; `run` writes them into
selected_indices.json and its last lines, `eval` prints them for the selection it trains on)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def real_reach(selected_per_class: Sequence[int], target_per_class: int, due_per_class: int | None = None,
               unmet: int | None = None) -> dict:
    """selected_per_class int [C]: real images selected per class; target_per_class: spc, the real
    images per class the run is to add; due_per_class: what the curricula run so far asked for
    (default: the target). `unmet` defaults to the images missing from C x due. Returns the JSON-able
    facts: real_per_class_target, real_selected, real_selected_per_class, unmet and unmet_per_class
    (due minus reached per class, never below 0)."""
    per_class = np.asarray(selected_per_class, np.int64)
    due = target_per_class if due_per_class is None else due_per_class
    missing = np.maximum(due - per_class, 0)
    return {"real_per_class_target": int(target_per_class), "real_selected": int(per_class.sum()),
            "real_selected_per_class": per_class.tolist(),
            "unmet": int(missing.sum() if unmet is None else unmet), "unmet_per_class": missing.tolist()}


def reach_text(reach: dict, distilled_per_class: int) -> str:
    """One line: the images per class trained on (distilled + real reached of the target) and the
    unmet count when it is not zero, e.g. '5 distilled + 28-35 (mean 31.4) of 50 real images per
    class; 186 real images unmet'."""
    per_class = np.asarray(reach["real_selected_per_class"], np.int64)
    target = reach["real_per_class_target"]
    low, high = (int(per_class.min()), int(per_class.max())) if len(per_class) else (0, 0)
    reached = f"{low}" if low == high else f"{low}-{high} (mean {per_class.mean():.1f})"
    text = f"{distilled_per_class} distilled + {reached} of {target} real images per class"
    if reach["unmet"]:
        text += f"; {reach['unmet']} real images unmet"
    return text
