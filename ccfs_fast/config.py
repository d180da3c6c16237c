"""Frozen, validated configuration dataclasses: one per command, plus the shared training recipe."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError, UnknownNameError
from .normalization import parse_normalize

OPTIMIZERS = ("sgd", "sgd_nesterov", "adamw", "rmsprop")
SCHEDULERS = ("cosineannealinglr", "steplr", "exponentiallr")
WARMUP_METHODS = ("linear", "constant")
FILTER_ACC_LOGGING = ("end", "best_last_20")


def require_file(path: Path | None, flag: str, hint: str) -> None:
    """A missing input is refused before anything heavy starts."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{flag} {path}: no such file; {hint}")


def require_betons(**betons: Path) -> None:
    for name, path in betons.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{name} {path}: no such .beton file; build it with `ccfs-fast build ...`")


def check_device(device: str) -> None:
    """A CUDA device asked for where torch sees none is refused before any work (seconds, not after
    the data is opened)."""
    if not device.startswith("cuda"):
        if device != "cpu":
            raise ConfigError(f"--device {device}: expected cpu, cuda or cuda:N")
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")


def distilled_shortage(source: Path, name: str, label: int, count: int, cpc: int) -> str:
    """The one message for a distilled class holding fewer than cpc images."""
    return (f"distilled set {source}: class {name!r} (label {label}) has {count} images, fewer than the {cpc} "
            "distilled images per class that ipc x alpha asks for; lower --alpha or --image-per-class, or build a "
            "larger distilled set")


def check_distilled_counts(distilled: Path, cpc: int) -> None:
    """Each class of the distilled set must hold cpc images (its manifest counts them; manifests of
    older builds do not, and the check then happens when the run opens the file)."""
    from beton_builder.manifest import read_manifest

    manifest = read_manifest(distilled)
    for c, (name, count) in enumerate(zip(manifest.class_names, manifest.class_counts or ())):
        if count < cpc:
            raise ConfigError(distilled_shortage(distilled, name, c, count, cpc))


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
    cuda_graphs: bool | None = None  # the whole KD step captured and replayed (ccfs_fast.step)
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


@dataclass(frozen=True)
class RunConfig:
    """`ccfs-fast run`: the CCFS curriculum (docs/design.md §1). Paths are .beton files / a checkpoint."""

    pool: Path
    test: Path
    distilled: Path
    teacher: Path
    output_dir: Path
    score_path: Path | None = None
    image_per_class: int = 500
    alpha: float = 0.2
    curriculum_num: int = 3
    select_misclassified: bool = True
    select_method: str = "simple"
    balance: bool = True
    score: str = "forgetting"
    shortfall: str = "fill"
    coarse_pass: str = "lazy"  # lazy: predict in selection order, stop each class once full (ccfs_fast.coarse)
    temperature: float = 20.0
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    fast: FastPath = field(default_factory=FastPath)
    num_eval: int = 5
    fuse_evals: bool = True  # train the num_eval evaluation models as one fused bank (ccfs_fast.fused)
    filter_model: str = "resnet18"
    teacher_model: str | None = None  # None: the arch the checkpoint records, else resnet18
    eval_model: str = "resnet18"
    filter_acc: str = "end"
    normalize: str | None = None  # None: the teacher's recorded one, else paper constants / pool stats
    notes: tuple[str, ...] = ()  # what the command line adjusted (printed, recorded; not a setting)
    device: str = "cpu"
    seed: int = 0
    workers: int = 2
    eval_batch_size: int = 256  # the paper's coarse-filtering batch; raise it on a GPU
    preset: str | None = None
    train_side: int | None = None  # pools of varying image size (build imagenet): train / eval side, default 224
    train_data: str = "auto"  # auto | resident | streamed (Workspace.train_form)
    tensorboard: bool = False  # per-epoch curves as TensorBoard event files too (RUN/tb/), besides curves.csv
    smoke: bool = False  # --smoke: a CPU-sized run (its accuracies are not meaningful, and say so)

    def __post_init__(self) -> None:
        _finite_fields(self)
        from .curves import check_tensorboard
        from .scores import check_score_kind, score_kind

        check_tensorboard(self.tensorboard)
        check_image_args(self.train_side, self.train_data)
        from .select import SELECTION_METHODS, SHORTFALL_POLICIES

        require_betons(pool=self.pool, test=self.test, distilled=self.distilled)
        require_file(self.teacher, "--teacher", "pass the teacher checkpoint (.pt / .pth)")

        if not 0 < self.alpha < 1:
            raise ConfigError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.image_per_class < 1:
            raise ConfigError(f"--image-per-class must be at least 1, got {self.image_per_class}")
        if self.cpc < 1:
            raise ConfigError(f"image-per-class x alpha = {self.image_per_class} x {self.alpha} gives "
                              f"{self.cpc} distilled images per class; raise --alpha or --image-per-class")
        if self.curriculum_num < 1:
            raise ConfigError(f"--curriculum-num must be at least 1, got {self.curriculum_num}")
        if self.spc < self.curriculum_num:
            raise ConfigError(f"{self.spc} real images per class to select cannot fill {self.curriculum_num} "
                              f"curricula; use --curriculum-num {max(1, self.spc)} or fewer")
        kind = score_kind(self.score)
        if kind.from_file and self.score_path is None:
            raise ConfigError(f"--score {self.score} needs --score-path FILE (.npy or .npz)")
        if kind.from_file:
            require_file(self.score_path, "--score-path", "pass the score file (.npy, or .npz with 'scores')")
            check_score_kind(self.score, self.score_path)
        _check_choice("selection method", self.select_method, tuple(SELECTION_METHODS))
        _check_choice("shortfall policy", self.shortfall, SHORTFALL_POLICIES)
        _check_choice("filter accuracy logging", self.filter_acc, FILTER_ACC_LOGGING)
        _check_choice("coarse pass", self.coarse_pass, ("lazy", "full"))
        if self.num_eval < 0 or self.temperature <= 0 or self.workers < 1:
            raise ConfigError(f"need --num-eval >= 0, -T > 0 and --workers >= 1; got {self.num_eval}, "
                              f"{self.temperature}, {self.workers}")
        parse_normalize(self.normalize)
        check_device(self.device)
        check_distilled_counts(self.distilled, self.cpc)

    @property
    def cpc(self) -> int:
        """Distilled images per class: floor(ipc * alpha)."""
        return int(self.image_per_class * self.alpha + 1e-9)

    @property
    def spc(self) -> int:
        """Real images per class to select."""
        return self.image_per_class - self.cpc

    def settings(self) -> dict:
        """Flat JSON-able settings: what --resume compares and exp_log.txt lists."""
        out = {}
        for f in fields(self):
            if f.name == "notes":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (TrainRecipe, FastPath)):
                out.update({k.name: getattr(value, k.name) for k in fields(value)})
            else:
                out[f.name] = str(value) if isinstance(value, Path) else value
        return out


TRAIN_DATA = ("auto", "resident", "streamed")


def check_image_args(train_side: int | None, train_data: str) -> None:
    """--train-side and --train-data: values in range / among the choices."""
    if train_side is not None and not 16 <= train_side <= 1024:
        raise ConfigError(f"--train-side must be between 16 and 1024 pixels, got {train_side}")
    _check_choice("train data form", train_data, TRAIN_DATA)


# Settings that may change between a run and its --resume without changing results.
RESUME_FREE = frozenset({"output_dir", "workers", "device", "eval_batch_size", "preset", "fuse_evals", "cuda_graphs",
                         "coarse_pass", "tensorboard"})


@dataclass(frozen=True)
class EvalConfig:
    """`ccfs-fast eval`: train num_eval models on distilled ∪ a saved selection."""

    pool: Path
    test: Path
    distilled: Path
    teacher: Path
    selection: Path | None
    image_per_class: int | None = None
    alpha: float | None = None
    temperature: float = 20.0
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    fast: FastPath = field(default_factory=FastPath)
    num_eval: int = 5
    fuse_evals: bool = True
    teacher_model: str | None = None  # None: the arch the checkpoint records, else resnet18
    eval_model: str = "resnet18"
    device: str = "cpu"
    seed: int = 0
    workers: int = 2
    eval_batch_size: int = 256  # the paper's coarse-filtering batch; raise it on a GPU
    output: Path | None = None
    normalize: str | None = None
    preset: str | None = None
    allow_incomplete: bool = False  # evaluate an unfinished run's selection
    run_dir: Path | None = None  # the run being reproduced (its accuracies are printed beside these)
    notes: tuple[str, ...] = ()
    train_side: int | None = None  # as RunConfig
    train_data: str = "auto"
    train_set: Path | None = None  # train on all of this .beton in its order (an export), not distilled ∪ selection

    def __post_init__(self) -> None:
        _finite_fields(self)
        check_image_args(self.train_side, self.train_data)
        require_betons(pool=self.pool, test=self.test, distilled=self.distilled)
        require_file(self.teacher, "--teacher", "pass the teacher checkpoint (.pt / .pth)")
        if self.train_set is None:
            require_file(self.selection, "--selection", "pass a selected_indices.json (or --run-dir RUN)")
        elif self.train_set != self.distilled:
            raise ConfigError("--train-set trains on that .beton alone; it takes the place of --distilled")
        if self.num_eval < 0 or self.temperature <= 0 or self.workers < 1:
            raise ConfigError(f"need --num-eval >= 0, -T > 0 and --workers >= 1; got {self.num_eval}, "
                              f"{self.temperature}, {self.workers}")
        parse_normalize(self.normalize)
        check_device(self.device)


EXPORT_FORMATS = ("folder", "beton", "both")


@dataclass(frozen=True)
class ExportConfig:
    """`ccfs-fast export RUN_DIR --out DIR`."""

    run_dir: Path
    out: Path
    format: str = "both"
    allow_incomplete: bool = False
    overwrite: bool = False
    workers: int = 2
    relocated: tuple[tuple[str, Path], ...] = ()  # (settings key, where the run's input is now): --pool, ...

    def __post_init__(self) -> None:
        _check_choice("export format", self.format, EXPORT_FORMATS)
        if not (self.run_dir / "state.json").is_file():
            raise ConfigError(f"{self.run_dir} has no state.json; pass the --output-dir of a `ccfs-fast run`")
        if self.out.exists() and not self.overwrite:
            raise ConfigError(f"{self.out} already exists; pass --overwrite to replace an earlier export, or choose "
                              "another --out")
        if self.run_dir.resolve() in self.out.resolve().parents:
            raise ConfigError(f"--out {self.out} lies inside the run directory; export next to it instead")


def teacher_recipe() -> TrainRecipe:
    """A standard supervised recipe for teachers: SGD lr 0.1, wd 5e-4, cosine, batch 128, 200 epochs."""
    return TrainRecipe(epochs=200, lr=0.1, weight_decay=5e-4, lr_warmup_epochs=0, batch_size=128)


@dataclass(frozen=True)
class TeacherConfig:
    """`ccfs-fast teacher`: supervised training on a pool .beton, optional forgetting scores."""

    pool: Path
    test: Path
    output: Path
    model: str = "resnet18"
    recipe: TrainRecipe = field(default_factory=teacher_recipe)
    fast: FastPath = field(default_factory=FastPath)
    forgetting_out: Path | None = None
    label_smoothing: float = 0.0
    device: str = "cpu"
    seed: int = 0
    workers: int = 2
    overwrite: bool = False
    normalize: str | None = None  # None: paper constants for cifar10/cifar100/tiny-imagenet, else pool stats
    notes: tuple[str, ...] = ()
    train_side: int | None = None  # pools of varying image size: the train / eval side (default 224)
    tensorboard: bool = False  # per-epoch curves as TensorBoard event files too (OUTPUT.tb/ beside the output)

    def __post_init__(self) -> None:
        _finite_fields(self)
        from .curves import check_tensorboard

        check_tensorboard(self.tensorboard)
        check_image_args(self.train_side, "auto")
        parse_normalize(self.normalize)
        require_betons(pool=self.pool, test=self.test)
        check_device(self.device)
        if self.output.suffix not in (".pt", ".pth"):
            raise ConfigError(f"--output must be a .pt or .pth file, got {self.output}")
        if self.forgetting_out is not None and self.forgetting_out.suffix != ".npy":  # --overwrite replaces it
            raise ConfigError(f"--forgetting-out must be a .npy file, got {self.forgetting_out}")
        for path in (self.output, self.forgetting_out):
            if path is not None and path.exists() and not self.overwrite:
                raise ConfigError(f"{path} already exists; pass --overwrite to replace it")

    @property
    def curves_path(self) -> Path:
        """The teacher's per-epoch curves: `teacher.pt` -> `teacher.curves.csv`."""
        return self.output.with_suffix(".curves.csv")


# The paper's published script settings (github_scripts/*.sh of the CCFS repository) per dataset and
# IPC. Shared by all: T=20, SGD lr 0.2 momentum 0.9 wd 1e-4, cosine after 5 linear warm-up epochs from
# 0.01, 3 curricula, misclassified, simple, balanced, forgetting score, 5 evaluations, resnet18 (the
# paper's network), and a class left short when it runs out of candidates, as the paper's code does.
_PAPER_COMMON = {"temperature": 20.0, "opt": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4,
                 "lr_scheduler": "cosineannealinglr", "lr_warmup_epochs": 5, "lr_warmup_method": "linear",
                 "lr_warmup_decay": 0.01, "curriculum_num": 3, "select_misclassified": True,
                 "select_method": "simple", "balance": True, "score": "forgetting", "num_eval": 5,
                 "filter_model": "resnet18", "eval_model": "resnet18", "shortfall": "short"}
# A preset never names the teacher's architecture: the checkpoint's record is used, else resnet18.


def _preset(ipc: int, alpha: float, epochs: int, **extra: object) -> dict:
    return {**_PAPER_COMMON, "image_per_class": ipc, "alpha": alpha, "epochs": epochs, **extra}


PRESETS: dict[str, dict] = {
    "cifar10-ipc250": _preset(250, 0.2, 500),
    "cifar10-ipc500": _preset(500, 0.1, 500),
    "cifar10-ipc1000": _preset(1000, 0.3, 250),
    "cifar10-ipc1500": _preset(1500, 0.3, 200),
    "cifar100-ipc25": _preset(25, 0.2, 500),
    "cifar100-ipc50": _preset(50, 0.1, 500),
    "cifar100-ipc100": _preset(100, 0.1, 250),
    "cifar100-ipc150": _preset(150, 0.2, 200),
    "tiny-imagenet-ipc50": _preset(50, 0.2, 100, batch_size=64),
    "tiny-imagenet-ipc100": _preset(100, 0.2, 100, batch_size=64),
    # Not the paper's: ImageNet-1K extrapolates its Tiny-ImageNet recipe (alpha 0.2, batch 64, 100 epochs)
    # to torchvision's unmodified resnet18 at 224 px; no forgetting scores are published for ImageNet, so
    # the c-score file (Jiang et al. 2021, keyed by file name) is passed with --score-path.
    **{f"imagenet-ipc{ipc}": _preset(ipc, 0.2, 100, batch_size=64, score="cscore", filter_model="torchvision:resnet18",
                                     eval_model="torchvision:resnet18") for ipc in (10, 50, 100)},
}
EXTRAPOLATED = frozenset(name for name in PRESETS if name.startswith("imagenet-"))

# The published forgetting scores (the paper's, Apache-2.0) shipped in the repository's scores/ folder,
# used by a preset of that dataset when --score-path is not given.
SCORES_DIR = Path(__file__).resolve().parents[1] / "scores"
PRESET_SCORES = {"cifar10-": "forgetting_CIFAR10.npy", "cifar100-": "forgetting_CIFAR100.npy",
                 "tiny-imagenet-": "forgetting_Tiny.npy"}


def published_scores(preset: str | None, values: dict) -> tuple[dict, list[str]]:
    """`values` with the preset's published score file as score_path when none was given (and the
    score kind is forgetting), and the note that says so; unchanged otherwise."""
    if preset is None or values.get("score_path") is not None or values.get("score", "forgetting") != "forgetting":
        return values, []
    name = next((f for prefix, f in PRESET_SCORES.items() if preset.startswith(prefix)), None)
    if name is None:
        return values, []
    path = SCORES_DIR / name
    if not path.is_file():
        raise ConfigError(f"--preset {preset} uses the published scores {path}, which are missing from this "
                          "checkout; restore the repository's scores/ folder or pass --score-path FILE")
    return {**values, "score_path": path}, [f"note: --preset {preset} uses the published forgetting scores {path} "
                                            "(no --score-path given)"]


# `--smoke`: a preset (or the defaults) at CPU size: the same algorithm, ipc, alpha, curricula, score and
# shortfall policy, with 2 epochs, the small ConvNet and 2 evaluation models.
SMOKE = {"epochs": 2, "lr_warmup_epochs": 1, "filter_model": "convnet_tiny", "eval_model": "convnet_tiny",
         "num_eval": 2}


def smoke_fit(values: dict, published: bool) -> tuple[dict, list[str]]:
    """--smoke fits the run to the inputs at hand instead of refusing them, and says what it changed:
    an ipc whose floor(ipc x alpha) distilled images per class the distilled set cannot give is lowered
    to what its smallest class holds (alpha kept); a published score file (chosen by the preset) whose
    length is not the pool's is replaced by --score logits (the filter's own logits: no file)."""
    from beton_builder.manifest import read_manifest

    from .errors import CCFSError

    notes: list[str] = []
    try:
        distilled, pool = read_manifest(values["distilled"]), read_manifest(values["pool"])
    except (CCFSError, KeyError, TypeError):
        return values, notes  # RunConfig names what is missing
    alpha = values.get("alpha", RunConfig.__dataclass_fields__["alpha"].default)
    ipc = values.get("image_per_class", RunConfig.__dataclass_fields__["image_per_class"].default)
    curricula = values.get("curriculum_num", RunConfig.__dataclass_fields__["curriculum_num"].default)
    fewest = min(distilled.class_counts or (0,))
    if fewest and int(ipc * alpha + 1e-9) > fewest:
        fitted = int((fewest + 1) / alpha - 1e-9)  # the largest ipc with floor(ipc x alpha) <= fewest
        while fitted > 1 and int(fitted * alpha + 1e-9) > fewest:
            fitted -= 1
        fitted = max(fitted, int(1 / alpha - 1e-9) + 1 + curricula)
        values = {**values, "image_per_class": fitted}
        cpc = int(fitted * alpha + 1e-9)
        notes.append(f"note: --smoke: the distilled set's smallest class holds {fewest} images; ipc {ipc} -> {fitted} "
                     f"(alpha {alpha}: {cpc} distilled + {fitted - cpc} real images per class)")
    path = values.get("score_path")
    if published and path is not None:
        import numpy as np

        count = len(np.load(path, mmap_mode="r"))
        if count != pool.n:
            values = {**values, "score": "logits", "score_path": None}
            notes.append(f"note: --smoke: the published score file {Path(path).name} holds {count:,} scores but the "
                         f"pool {pool.n:,} images; ranking by the filter's logits instead (--score logits); pass "
                         "--score-path FILE (e.g. from `ccfs-fast teacher --forgetting-out`) to use your own")
    return values, notes


RUN_PATHS = ("pool", "test", "distilled", "teacher", "output_dir", "score_path")


def make_run_config(preset: str | None = None, smoke: bool = False, **settings: object) -> RunConfig:
    """A RunConfig as `ccfs-fast run` makes it: the preset's settings (or the defaults), --smoke's CPU
    size and fitting (smoke_fit), the preset's published scores when no --score-path is given, then
    `settings` (flat: RunConfig's fields, TrainRecipe's and FastPath's) over them; every adjustment is
    in the config's notes."""
    check_finite(settings)  # before --smoke's fitting does arithmetic with them
    paths = {k: Path(v) for k, v in settings.items() if k in RUN_PATHS and v is not None}  # str or Path
    values, notes = published_scores(preset, {**preset_settings(preset), **(SMOKE if smoke else {}), **settings,
                                              **paths})
    if smoke:
        values, fitted = smoke_fit(values, published=bool(notes))
        notes += fitted
    recipe, rest = split_recipe({**values, "preset": preset, "smoke": smoke})
    rest["notes"] = tuple(notes) + rest["notes"]
    return RunConfig(recipe=recipe, **rest)


SETTINGS_SOURCE = {False: "the paper's script", True: "extrapolated, not the paper's"}


def preset_table() -> str:
    """The presets as a Markdown table (the README's, generated here so it cannot drift)."""
    head = ("| preset | dataset | ipc | alpha | distilled / real per class | epochs | batch | curricula | models "
            "| evaluations | shortfall | settings |")
    rows = [head, "|" + "---|" * 12]
    for name, p in PRESETS.items():
        cpc = int(p["image_per_class"] * p["alpha"] + 1e-9)
        batch = p.get("batch_size") or "auto"
        rows.append(f"| `{name}` | {name.rsplit('-ipc', 1)[0]} | {p['image_per_class']} | {p['alpha']} | "
                    f"{cpc} / {p['image_per_class'] - cpc} | {p['epochs']} | {batch} | {p['curriculum_num']} | "
                    f"{p['filter_model']} | {p['num_eval']} | {p['shortfall']} | "
                    f"{SETTINGS_SOURCE[name in EXTRAPOLATED]} |")
    return "\n".join(rows)


RECIPE_KEYS = frozenset(f.name for f in fields(TrainRecipe))
FAST_KEYS = frozenset(f.name for f in fields(FastPath))


def preset_settings(name: str | None, command: type | None = None) -> dict:
    """The preset's flat settings; with `command` (a config class), only those it takes (for `eval`:
    the recipe, T, models, num_eval; the selection file keeps its own ipc and alpha)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise UnknownNameError("preset", name, list(PRESETS))
    values = dict(PRESETS[name])
    if command is not None:
        own = {f.name for f in fields(command)} - {"image_per_class", "alpha"}
        values = {k: v for k, v in values.items() if k in own or k in RECIPE_KEYS or k in FAST_KEYS}
    return values


def fit_warmup(recipe: dict, base: TrainRecipe) -> tuple[dict, list[str]]:
    """Clamps a warm-up that does not fit the epochs (e.g. the default 5 with --epochs 2) to
    epochs - 1, so short smoke runs just work; returns the recipe values and the printed note."""
    epochs = recipe.get("epochs", base.epochs)
    warmup = recipe.get("lr_warmup_epochs", base.lr_warmup_epochs)
    if epochs < 1 or warmup < epochs:
        return recipe, []
    note = (f"note: --lr-warmup-epochs {warmup} does not fit --epochs {epochs}; using {epochs - 1} warm-up "
            f"epoch{'s' if epochs - 1 != 1 else ''}")
    return {**recipe, "lr_warmup_epochs": epochs - 1}, [note]


def split_recipe(values: dict, base: TrainRecipe | None = None) -> tuple[TrainRecipe, dict]:
    """Separates the training-recipe and fast-path keys of a flat settings dict: (recipe = `base`
    (default TrainRecipe()) with the given keys replaced, the other keys with `fast` and `notes` set)."""
    base = base or TrainRecipe()
    recipe_values, notes = fit_warmup({k: v for k, v in values.items() if k in RECIPE_KEYS}, base)
    recipe = replace(base, **recipe_values)
    rest = {k: v for k, v in values.items() if k not in RECIPE_KEYS and k not in FAST_KEYS}
    rest["fast"] = FastPath(**{k: v for k, v in values.items() if k in FAST_KEYS})
    rest["notes"] = tuple(notes)
    return recipe, rest
