"""What a curriculum records: one typed PhaseRecord per curriculum, the schema of state.json's and
metrics.json's `phases` (to_json writes it, from_json reads it back, older runs' records included, their
missing fields at their defaults). The run's log, its report and its resume read phases through it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Shortfall:
    """How a curriculum met its per-class budget: the policy, the classes short of candidates, what
    `fill` added per class and what stayed unmet."""

    policy: str = "fill"
    classes_short: int = 0
    short_classes: list[int] = field(default_factory=list)
    filled_per_class: list[int] = field(default_factory=list)
    filled: int = 0
    unmet: int = 0


@dataclass
class PhaseRecord:
    """One curriculum: its budget and train set, how its filter trained (seconds split into set-up,
    loop and test evaluation; images/s; how the step ran), how its coarse pass ran (predicted of
    eligible, rounds, seconds), the filter's accuracy, the candidates and the selection per class."""

    phase: int
    curpc: int
    train_size: int
    selected: int
    batch_size: int | None = None
    train_s: float = 0.0
    train_loop_s: float | None = None
    train_eval_s: float | None = None
    train_setup_s: float | None = None
    train_img_per_s: float | None = None
    execution: dict | None = None
    coarse_pass: str = "full"
    pool_eligible: int | None = None
    pool_evaluated: int = 0
    coarse_rounds: int | None = None
    eval_s: float = 0.0
    eval_img_per_s: float = 0.0
    select_s: float = 0.0
    filter_acc: float | None = None
    filter_acc_rule: str = "end"
    filter_last_acc: float | None = None
    unpredicted_eligible: int | None = None
    teacher_pass: str = "full"  # lazy: pool_eligible counts the teacher-correct among the images the pass reached
    teacher_predicted: int = 0  # pool images the teacher predicted in this curriculum (lazy pass)
    teacher_s: float = 0.0      # seconds those predictions took (part of eval_s)
    teacher_known: int | None = None  # pool images the teacher has predicted by the end of this curriculum
    candidates: int = 0
    candidates_per_class: list[int] = field(default_factory=list)
    selected_per_class: list[int] = field(default_factory=list)
    shortfall: Shortfall = field(default_factory=Shortfall)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> PhaseRecord:
        """A record as written by this or an earlier version (fields it lacks at their defaults; the
        eligible count of a run from before lazy passes is what it predicted)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["shortfall"] = Shortfall(**{k: v for k, v in (data.get("shortfall") or {}).items()
                                           if k in {f.name for f in fields(Shortfall)}})
        record = cls(**values)
        if record.pool_eligible is None:
            record.pool_eligible = record.pool_evaluated
        return record

    @property
    def survivor_rate(self) -> float | None:
        """The share of predicted images that survived the coarse stage (None before any prediction)."""
        if not self.pool_evaluated:
            return None
        return min(1.0, self.candidates / self.pool_evaluated)  # state.json of older runs overcounted


def phase_records(state: dict) -> list[PhaseRecord]:
    """The typed records of a run state's (or metrics.json's) `phases`."""
    return [PhaseRecord.from_json(p) for p in state.get("phases") or []]
