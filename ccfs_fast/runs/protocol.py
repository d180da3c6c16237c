"""The evaluation protocol's pure parts: the random baseline's draw at the same IPC, DD-Ranking's scores
(HLR, IOR, LRS) from the accuracies of each evaluation seed, and the result table. No torch, no I/O.

DD-Ranking (NUS-HPC-AI-Lab, ddranking 0.2.0, `metrics/hard_label.py` and `soft_label.py`), per evaluation
seed i, accuracies as fractions:

    HLR_i = acc_full_hard - acc_set_hard_i        (hard labels always)
    IOR_i = acc_set_i - acc_random_i              (under the set's own label regime)
    a_i   = lambda * IOR_i - (1 - lambda) * HLR_i, lambda = 0.5
    LRS_i = (exp(a_i) - exp(-1)) / (e - exp(-1))

then the mean and the (population) standard deviation over the seeds, as its code reports them.

ddranking 0.2.0's code itself feeds the formula accuracies in percent (its `validate` returns top-1 in
%), which puts a in percent points and LRS outside [0, 1] (-0.157 in the limit once HLR exceeds IOR by
more than a few points); eval.json keeps that figure too (`lrs_as_ddranking_0_2_0`), to compare with a number
printed by that version."""
from __future__ import annotations

import math

import numpy as np

LRS_LAMBDA = 0.5


def random_draw(pool_labels: np.ndarray, per_class: np.ndarray, seed: int) -> np.ndarray:
    """int64 pool indices: for each class c, per_class[c] images drawn uniformly without replacement from
    the pool images of class c (one generator seeded with `seed`, classes in label order); class by
    class, each class's draw in ascending pool order."""
    rng = np.random.default_rng(seed)
    out = []
    for c, count in enumerate(np.asarray(per_class, np.int64)):
        members = np.flatnonzero(pool_labels == c)
        if count > len(members):
            raise ValueError(f"class {c} has {len(members)} pool images, fewer than the {count} to draw")
        out.append(np.sort(rng.choice(members, int(count), replace=False)))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def lrs(ior: float, hlr: float, lam: float = LRS_LAMBDA) -> float:
    """DD-Ranking's label-robust score of one seed (IOR and HLR as fractions)."""
    a = lam * ior - (1 - lam) * hlr
    return (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))


def ddranking_scores(set_accs: list[float], random_accs: list[float], set_hard_accs: list[float],
                     full_data_acc: float, lam: float = LRS_LAMBDA) -> dict:
    """Per evaluation seed and as mean / std: HLR, IOR and LRS from accuracies in percent (converted to
    fractions, as DD-Ranking computes them): the set's and the random subset's under the set's regime, the
    set's under hard labels, the full data's under hard labels."""
    seeds = min(len(set_accs), len(random_accs), len(set_hard_accs))
    hlr = [full_data_acc / 100 - set_hard_accs[i] / 100 for i in range(seeds)]
    ior = [set_accs[i] / 100 - random_accs[i] / 100 for i in range(seeds)]
    scores = [lrs(ior[i], hlr[i], lam) for i in range(seeds)]
    as_printed = [lrs(100 * ior[i], 100 * hlr[i], lam) for i in range(seeds)]  # ddranking 0.2.0: percent inputs
    out = {"lambda": lam, "full_data_acc": full_data_acc, "hlr": hlr, "ior": ior, "lrs": scores,
           "lrs_as_ddranking_0_2_0": as_printed}
    for name, values in (("hlr", hlr), ("ior", ior), ("lrs", scores), ("lrs_as_ddranking_0_2_0", as_printed)):
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
    return out


def protocol_row(architecture: str, labels: str, ccfs: dict, random: dict | None, scores: dict | None) -> dict:
    """One architecture's row: CCFS's and the random baseline's per-seed accuracies (each run's best) and
    mean / std, their per-seed difference, and DD-Ranking's scores when computed."""
    row = {"architecture": architecture, "labels": labels, "ccfs_accs": ccfs["accs"],
           "ccfs_mean": ccfs["acc_mean"], "ccfs_std": ccfs["acc_std"]}
    if random is not None:
        diff = [a - b for a, b in zip(ccfs["accs"], random["accs"])]
        row.update(random_accs=random["accs"], random_mean=random["acc_mean"], random_std=random["acc_std"],
                   difference=diff)
        row["difference_mean"], row["difference_std"] = mean_std(diff)
    if scores is not None:
        row["ddranking"] = scores
    return row


def plus_minus(mean: float | None, std: float | None, digits: int = 2) -> str:
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def protocol_table(rows: list[dict]) -> tuple[list[str], list[tuple]]:
    """(header, rows) of the result table: per architecture and label regime, CCFS and random (top-1 %,
    mean ± std over the evaluation seeds), their difference, and DD-Ranking's HLR, IOR, LRS."""
    header = ["architecture", "labels", "CCFS %", "random %", "CCFS - random", "HLR", "IOR", "LRS"]
    out = []
    for r in rows:
        d = r.get("ddranking") or {}
        cells = [plus_minus(r.get(f"{k}_mean"), r.get(f"{k}_std")) for k in ("ccfs", "random", "difference")]
        cells += [plus_minus(d.get(f"{k}_mean"), d.get(f"{k}_std"), 4) for k in ("hlr", "ior", "lrs")]
        out.append((r["architecture"], r["labels"], *cells))
    return header, out
