"""The training recipe (optimiser, schedule, batch size) and the fast-path switches: the settings of every
training, and their value checks (no torch: naming them and checking values stays light)."""
from __future__ import annotations

from dataclasses import dataclass

from beton_builder.base.errors import ConfigError
from ccfs_fast.train.settings import check_choice, finite_fields, setting

OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw", "rmsprop")

SCHEDULERS = ("cosineannealinglr", "steplr", "exponentiallr")

WARMUP_METHODS = ("linear", "constant")

@dataclass(frozen=True)
class TrainRecipe:
    """Optimiser and learning-rate schedule (the paper script's flags); stepped once per epoch."""

    epochs: int = setting(500, "epochs of every model")
    opt: str = setting("sgd", " | ".join(OPTIMIZERS))
    lr: float = setting(0.2, "learning rate")
    momentum: float = setting(0.9, "momentum")
    weight_decay: float = setting(1e-4, "weight decay on all parameters", flags=("--weight-decay", "--wd"))
    lr_scheduler: str = setting("cosineannealinglr", " | ".join(SCHEDULERS))
    lr_step_size: int = setting(30, "steplr: epochs a step")
    lr_gamma: float = setting(0.1, "steplr / exponentiallr factor")
    lr_warmup_epochs: int = setting(5, "warm-up epochs (clamped to epochs - 1 when longer)")
    lr_warmup_method: str = setting("linear", " | ".join(WARMUP_METHODS))
    lr_warmup_decay: float = setting(0.01, "warm-up start factor")
    batch_size: int | None = setting(None, "an integer, or auto: the dataset's rule (CIFAR-10 |T| < 500 C -> 32, "
                                     "< 1000 C -> 64, else 128; CIFAR-100 50 C / 100 C; Tiny-ImageNet 64)",
                                     arg_type="batch_size", shown="auto")  # None: "auto" by train-set size

    def __post_init__(self) -> None:
        finite_fields(self)
        check_choice("optimizer", self.opt, OPTIMIZERS)
        check_choice("lr scheduler", self.lr_scheduler, SCHEDULERS)
        check_choice("lr warm-up method", self.lr_warmup_method, WARMUP_METHODS)
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

    channels_last: bool | None = setting(None, "channels-last memory layout", shown="on for CUDA")
    bf16: bool = setting(False, "bf16 autocast for teacher and student", shown="off; fp32 as the paper's code")
    cudnn_benchmark: bool = setting(True, "cuDNN autotuning", shown="on for CUDA", gpu_only=True)
    fused_optimizer: bool | None = setting(None, "fused SGD / AdamW kernels", shown="on for CUDA", gpu_only=True)
    compile: bool = setting(False, "torch.compile the students")
    cuda_graphs: bool | None = setting(None, "capture the whole train step in CUDA graphs", shown="on for CUDA",
                                       resume_free=True, gpu_only=True)  # ccfs_fast.train.graphs
    infer_channels_last: bool | None = setting(None, cli=False)  # resolved from channels_last: see the docstring

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
