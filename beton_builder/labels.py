"""Labels are integers in range, or the build is refused: one rule for every builder, each refusal in one
line that names the row, the value and the fix."""
from __future__ import annotations

import numpy as np

from beton_builder.base.errors import BuildError


def whole_labels(values: np.ndarray, where: str) -> np.ndarray:
    """int64 [n] from integer labels, or from floats that hold whole numbers (a table's float column of
    0.0, 1.0, ...); a fractional, non-finite or non-numeric label is refused, naming its row."""
    values = np.asarray(values)
    numeric = np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)
    if values.dtype == bool or not numeric:
        raise BuildError(f"{where}: labels are {values.dtype}, not integers; store each image's class as an integer "
                         "0..C-1 (or its class name as a string)")
    if np.issubdtype(values.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if len(bad):
            row = int(bad[0])
            raise BuildError(f"{where}: label {float(values[row])!r} at row {row} is not a whole number "
                             f"({len(bad)} such rows); labels are class indices 0..C-1: store them as integers "
                             "(soft labels are [n, C] probabilities, not one value per image)")
    return values.astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, where: str, counted: str = "",
                 fix: str = "fix the labels, or give the class count that matches them") -> None:
    """Every label in [0, num_classes), else refused naming the first row outside and its value.
    `counted`: where num_classes came from, said after the count (e.g. " named in the metadata")."""
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        row = int(bad[0])
        raise BuildError(f"{where}: label {int(labels[row])} at row {row} lies outside 0..{num_classes - 1} "
                         f"({num_classes} classes{counted}; {len(bad)} rows outside); {fix}")


def inferred_class_count(labels: np.ndarray, where: str, flag: str) -> int:
    """The class count of labels that name no classes: the largest label + 1, provided every class below
    it has an image. A label beyond the set's classes (12 in a 10-class set) would otherwise make empty
    classes silently (here: classes 10 and 11, and a 13-class .beton); refused, naming the label, its row
    and `flag`, the way to state the count."""
    labels = np.asarray(labels)
    if not len(labels):
        return 0
    if labels.min() < 0:
        row = int(np.argmin(labels))
        raise BuildError(f"{where}: label {int(labels[row])} at row {row} is negative; labels are class indices "
                         "0..C-1 (an unlabelled split, -1, cannot be built)")
    count = int(labels.max()) + 1
    empty = np.flatnonzero(np.bincount(labels, minlength=count) == 0)
    if len(empty):
        row = int(np.argmax(labels))
        shown = ", ".join(str(int(c)) for c in empty[:6]) + (", ..." if len(empty) > 6 else "")
        raise BuildError(f"{where}: no image has label {shown} although label {int(labels[row])} (row {row}) makes "
                         f"{count} classes; fix the labels, or pass {flag} with the set's class count if those "
                         "classes are meant to be empty")
    return count
