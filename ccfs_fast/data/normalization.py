"""Which mean/std normalise every image of a run (docs/design.md §1.0): the paper's constants for the datasets
its code knows, the pool's measured statistics otherwise, or what the teacher was trained with.

`--normalize paper|pool|M1,M2,M3,S1,S2,S3` overrides the choice; a teacher checkpoint made by
`ccfs-fast teacher` records its normalisation, which a run then uses (a conflicting explicit
`--normalize` is refused). Pure: no torch, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from beton_builder.base.errors import ConfigError, DataError
from ccfs_fast.data.datasets import dataset_facts

NORMALIZE_HELP = ("paper (the paper's constants for cifar10 / cifar100 / tiny-imagenet, torchvision's for imagenet), "
                  "pool (the pool's measured mean/std) or six numbers M1,M2,M3,S1,S2,S3 (RGB mean then std, 0..1 "
                  "units)")
NORMALIZE_WORDS = ("paper", "pool")


@dataclass(frozen=True)
class Normalization:
    """Per-channel (RGB) mean and std in [0, 1] pixel units: x_norm = (x / 255 - mean) / std.
    `source` says where they came from (e.g. 'paper:cifar10', 'pool', 'explicit', 'teacher')."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def __post_init__(self) -> None:
        check_stats(self.mean, self.std, f"normalisation ({self.source})")

    def same_values(self, other: Normalization, tol: float = 1e-6) -> bool:
        return all(abs(a - b) <= tol for a, b in zip(self.mean + self.std, other.mean + other.std))

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "source": self.source}

    @classmethod
    def from_json(cls, obj: dict, source: str) -> Normalization:
        try:
            return cls(tuple(float(v) for v in obj["mean"]), tuple(float(v) for v in obj["std"]), source)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: malformed normalisation record {obj!r} ({exc})") from exc

    def describe(self) -> str:
        fmt = ",".join(f"{v:g}" for v in self.mean + self.std)
        return f"{self.source} ({fmt})"


def check_stats(mean: tuple, std: tuple, where: str) -> None:
    """mean and std: three finite numbers each, std > 0; DataError naming `where` otherwise."""
    if len(mean) != 3 or len(std) != 3:
        raise DataError(f"{where}: need 3 mean and 3 std values, got {list(mean)} and {list(std)}")
    if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        raise DataError(f"{where}: mean {list(mean)} / std {list(std)} must be finite with std > 0 (a constant "
                        "or corrupt image set?); rebuild the .beton or pass --normalize M1,M2,M3,S1,S2,S3")


def parse_normalize(text: str | None) -> str | tuple[float, ...] | None:
    """None (automatic), 'paper', 'pool' or six floats; ConfigError saying what to pass otherwise."""
    if text is None:
        return None
    word = text.strip().lower()
    if word in NORMALIZE_WORDS:
        return word
    parts = [p for p in word.split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--normalize {text!r} is neither a word nor numbers; pass {NORMALIZE_HELP}") from None
    if len(values) != 6:
        raise ConfigError(f"--normalize {text!r} has {len(values)} numbers, expected 6; pass {NORMALIZE_HELP}")
    if not all(math.isfinite(v) for v in values) or min(values[3:]) <= 0:
        raise ConfigError(f"--normalize {text!r}: the numbers must be finite and the three std values > 0")
    return values


def from_request(request: str | tuple[float, ...], dataset: str | None, pool_mean: tuple, pool_std: tuple,
                 pool_path: str) -> Normalization:
    """The normalisation a parsed --normalize value asks for, for a pool of `dataset`."""
    if request == "paper":
        facts = dataset_facts(dataset)
        if facts.mean is None:
            raise ConfigError(f"--normalize paper: the pool {pool_path} holds {dataset or 'image-folder / arrays'} "
                              "data, for which the paper has no constants; pass --normalize pool or "
                              "M1,M2,M3,S1,S2,S3")
        return Normalization(facts.mean, facts.std, f"paper:{facts.name}")
    if request == "pool":
        check_stats(pool_mean, pool_std, f"{pool_path} manifest")
        return Normalization(tuple(pool_mean), tuple(pool_std), "pool")
    return Normalization(tuple(request[:3]), tuple(request[3:]), "explicit")


def resolve_normalization(request: str | tuple[float, ...] | None, dataset: str | None, pool_mean: tuple,
                          pool_std: tuple, pool_path: str, teacher: Normalization | None = None,
                          teacher_path: str = "") -> Normalization:
    """The run's normalisation. Automatic (request None): the teacher's recorded one, else the paper's
    constants for a dataset it knows, else the pool's statistics. An explicit request that differs
    from the teacher's recorded normalisation is refused."""
    if request is None:
        if teacher is not None:
            return teacher
        return from_request("paper" if dataset_facts(dataset).mean is not None else "pool", dataset, pool_mean,
                            pool_std, pool_path)
    chosen = from_request(request, dataset, pool_mean, pool_std, pool_path)
    if teacher is not None and not chosen.same_values(teacher):
        raise ConfigError(f"--normalize gives {chosen.describe()} but the teacher {teacher_path} was trained with "
                          f"{teacher.describe()}; drop --normalize (the teacher's is used) or use a teacher trained "
                          "with that normalisation")
    return chosen
