"""Frozen configs of the commands (run, eval, export, teacher), built from shared parts."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from beton_builder.base.errors import ConfigError
from ccfs_fast.data.normalization import parse_normalize
from ccfs_fast.train.recipe import FastPath, TrainRecipe, _check_choice, _finite_fields

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
    coarse_pass: str = "lazy"  # lazy: predict in selection order, stop each class once full (selection.coarse)
    temperature: float = 20.0
    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    fast: FastPath = field(default_factory=FastPath)
    num_eval: int = 5
    fuse_evals: bool = True  # train the num_eval evaluation models as one fused bank (ccfs_fast.train.bank)
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
        from ccfs_fast.runs.curves import check_tensorboard
        from ccfs_fast.selection.scores import check_score_kind, score_kind

        check_tensorboard(self.tensorboard)
        check_image_args(self.train_side, self.train_data)
        from ccfs_fast.selection.kernels import SELECTION_METHODS, SHORTFALL_POLICIES

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
        from ccfs_fast.runs.curves import check_tensorboard

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

RECIPE_KEYS = frozenset(f.name for f in fields(TrainRecipe))

FAST_KEYS = frozenset(f.name for f in fields(FastPath))


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
