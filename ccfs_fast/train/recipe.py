"""The training recipe (optimiser, schedule, batch size) and the fast-path switches: the settings of every
training, and their value checks (no torch: naming them and checking values stays light)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from beton_builder.base.errors import ConfigError, UnknownNameError

OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw", "rmsprop")

SCHEDULERS = ("cosineannealinglr", "steplr", "exponentiallr")

WARMUP_METHODS = ("linear", "constant")

FLAG_NAMES = {"temperature": "-T"}  # a setting's flag where it is not --<name with dashes>


def flag_of(name: str) -> str:
    """The command-line flag of setting `name`: --image-per-class, -T, ..."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def check_finite(values: dict) -> None:
    """Every number among `values` (settings by name) is finite: NaN or infinity in --lr, -T, --alpha,
    ... is refused before any work (a NaN passes every `> 0` check and would fail hours later)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag_of(name)} {value}: must be a finite number")


def _finite_fields(config: object) -> None:
    check_finite({f.name: getattr(config, f.name) for f in fields(config)})


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise UnknownNameError(kind, value, list(valid))


@dataclass(frozen=True)
class TrainRecipe:
    """Optimiser and learning-rate schedule (the paper script's flags); stepped once per epoch."""

    epochs: int = 500
    opt: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_scheduler: str = "cosineannealinglr"
    lr_step_size: int = 30
    lr_gamma: float = 0.1
    lr_warmup_epochs: int = 5
    lr_warmup_method: str = "linear"
    lr_warmup_decay: float = 0.01
    batch_size: int | None = None  # None: the paper's "auto" policy by train-set size

    def __post_init__(self) -> None:
        _finite_fields(self)
        _check_choice("optimizer", self.opt, OPTIMIZERS)
        _check_choice("lr scheduler", self.lr_scheduler, SCHEDULERS)
        _check_choice("lr warm-up method", self.lr_warmup_method, WARMUP_METHODS)
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.lr_warmup_epochs < self.epochs:
            raise ConfigError(f"--lr-warmup-epochs must be in [0, epochs={self.epochs}), got {self.lr_warmup_epochs}")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_warmup_decay <= 1:
            raise ConfigError(f"need lr > 0, weight decay >= 0 and 0 < warm-up decay <= 1; got lr={self.lr}, "
                              f"weight decay={self.weight_decay}, warm-up decay={self.lr_warmup_decay}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"--batch-size must be 'auto' or a positive integer, got {self.batch_size}")


@dataclass(frozen=True)
class FastPath:
    """Fast-path switches; None means 'on where it helps' (CUDA), off on the CPU. Each resolved
    value is recorded in metrics.json. bf16 is opt-in: the defaults compute in fp32, as the paper's
    code does (docs/design.md §1.0). `channels_last` is the layout of training; prediction and evaluation
    (the teacher's forward, pool passes, test accuracy) use channels-last on every device unless
    channels_last is set False (on a 2-core CPU: ResNet-18 at 32x32 1.4x, the ConvNet at 64x64 1.3-1.9x;
    training stays NCHW there, where GroupNorm's channels-last backward is 5x slower)."""

    channels_last: bool | None = None
    bf16: bool = False
    cudnn_benchmark: bool = True
    fused_optimizer: bool | None = None
    compile: bool = False
    cuda_graphs: bool | None = None  # the whole KD step captured and replayed (ccfs_fast.train.step)
    infer_channels_last: bool | None = None  # resolved from channels_last: see the class docstring

    def resolve(self, device: str) -> FastPath:
        cuda = device.startswith("cuda")
        return FastPath(channels_last=cuda if self.channels_last is None else self.channels_last,
                        bf16=bool(self.bf16),
                        cudnn_benchmark=self.cudnn_benchmark and cuda,
                        fused_optimizer=cuda if self.fused_optimizer is None else self.fused_optimizer,
                        compile=self.compile,
                        cuda_graphs=cuda if self.cuda_graphs is None else (self.cuda_graphs and cuda),
                        infer_channels_last=(self.channels_last is not False if self.infer_channels_last is None
                                             else self.infer_channels_last))
