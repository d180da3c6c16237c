"""Frozen configs of the commands (run, eval, export, teacher), built from shared parts: Inputs (the files
and how their images are read), Machine, Evaluation (how a set is evaluated), the training recipe and the
fast path (ccfs_fast.train.recipe), and for `run` the Selection. Each setting is declared once, as a
field with its help (ccfs_fast.train.settings); flags, state.json's flat settings, what --resume may
change and what `eval --run-dir` reuses are derived from the fields. __post_init__ checks values only;
`check_files()` is the one explicit step that reads files (and asks torch for CUDA)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from beton_builder.base.errors import ConfigError
from ccfs_fast.data.normalization import NORMALIZE_HELP, parse_normalize
from ccfs_fast.selection.scores import SCORE_KINDS, check_score_kind, score_kind
from ccfs_fast.train.models import MODEL_NAMES_HELP
from ccfs_fast.train.recipe import FastPath, TrainRecipe
from ccfs_fast.train.settings import check_choice, finite_fields, flat_settings, names_where, setting

FILTER_ACC_LOGGING = ("end", "best_last_20")
TRAIN_DATA = ("auto", "resident", "streamed")
COARSE_PASSES = ("lazy", "full")
EXPORT_FORMATS = ("folder", "beton", "both", "tensors", "all")  # both: folder + beton; all: + tensors
LABEL_REGIMES = ("teacher", "hard", "soft")  # train.students.OBJECTIVE_OF
BASELINES = ("random",)
SCORE_HELP = " | ".join(f"{k.name} ({'high true-class logit' if k.name == 'logits' else k.easy_end} = easy)"
                        for k in SCORE_KINDS.values())
METHOD_HELP = "simple (easiest first) | hard (hardest first) | random (seeded)"
SHORTFALL_HELP = ("fill (top a short class up from its other teacher-correct images) | strict (stop with an error) "
                  "| short (leave it short, as the paper's code)")


def require_file(path: Path | None, flag: str, hint: str) -> None:
    """A missing input is refused before anything heavy starts."""
    if path is None or not Path(path).is_file():
        raise ConfigError(f"{flag} {path}: no such file; {hint}" if path is not None else f"{flag} is required; {hint}")


def require_betons(**betons: Path | None) -> None:
    for name, path in betons.items():
        if path is None:
            raise ConfigError(f"--{name} is required: the .beton file (build it with `ccfs-fast build ...`)")
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
class Inputs:
    """The files a command reads, and how their images are read and normalised."""

    pool: Path | None = setting(None, "the training pool .beton (ccfs-fast build)")
    test: Path | None = setting(None, "the test .beton")
    distilled: Path | None = setting(None, "the distilled images .beton (ccfs-fast build folder)")
    teacher: Path | None = setting(None, "teacher checkpoint (.pt / .pth)")
    teacher_model: str | None = setting(None, f"the teacher's architecture: {MODEL_NAMES_HELP}",
                                        shown="the arch its checkpoint records, else resnet18")
    train_side: int | None = setting(None, "pools of varying image size (`build imagenet`): the side images are "
                                     "trained at (RandomResizedCrop) and evaluated at (centre crop of 7/8 the short "
                                     "side)", shown=224)
    train_data: str = setting("auto", "how a train set is read: resident (once, uint8 on the device) or streamed "
                              "through FFCV's decoders every step; auto: resident when it fits in half the free device "
                              "memory", choices=TRAIN_DATA)
    normalize: str | None = setting(None, NORMALIZE_HELP, shown="what the teacher checkpoint records, else the "
                                    "paper's constants for cifar10 / cifar100 / tiny-imagenet, else the pool's "
                                    "statistics")

    def __post_init__(self) -> None:
        if self.train_side is not None and not 16 <= self.train_side <= 1024:
            raise ConfigError(f"--train-side must be between 16 and 1024 pixels, got {self.train_side}")
        check_choice("train data form", self.train_data, TRAIN_DATA)
        parse_normalize(self.normalize)


@dataclass(frozen=True)
class Machine:
    """Where and how a command computes."""

    device: str = setting("cpu", "cpu | cuda | cuda:N", resume_free=True)
    seed: int = setting(0, "seed of every model and draw")
    workers: int = setting(2, "FFCV reader threads", resume_free=True)
    eval_batch_size: int = setting(256, "batch of pool / test prediction (raise it on a GPU)", resume_free=True)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"need --workers >= 1 and --eval-batch-size >= 1; got {self.workers}, "
                              f"{self.eval_batch_size}")


@dataclass(frozen=True)
class Evaluation:
    """How a set is evaluated: num_eval fresh models trained by KD from the teacher at temperature T."""

    temperature: float = setting(20.0, "KD temperature", flags=("-T", "--temperature"))
    eval_model: str = setting("resnet18", "model of the final evaluation (eval: a,b,c evaluates on each, one row per "
                              "architecture)")
    num_eval: int = setting(5, "final evaluation models")
    fuse_evals: bool = setting(True, "train the evaluation models as one fused network", resume_free=True)
    labels: str = setting("teacher", "the evaluation's labels: teacher (KD from the live teacher, the paper's) | hard "
                          "(cross-entropy on the dataset's labels; distilled images take their class) | soft (the "
                          "teacher's softened outputs on each image, fixed once: no live teacher)",
                          choices=LABEL_REGIMES)

    def __post_init__(self) -> None:
        finite_fields(self)
        check_choice("label regime", self.labels, LABEL_REGIMES)
        if self.num_eval < 0 or self.temperature <= 0:
            raise ConfigError(f"need --num-eval >= 0 and -T > 0; got {self.num_eval}, {self.temperature}")


TEACHER_PASSES = ("lazy", "full")  # when the teacher predicts a pool image: when first reached, or all first


@dataclass(frozen=True)
class Selection:
    """What a run selects and how (docs/design.md §1)."""

    image_per_class: int = setting(500, "target images per class (ipc)")
    alpha: float = setting(0.2, "distilled share: floor(ipc x alpha) distilled images per class")
    curriculum_num: int = setting(3, "curricula (phases)")
    select_misclassified: bool = setting(True, "keep the filter's misclassified candidates (else its correct ones)")
    select_method: str = setting("simple", METHOD_HELP)
    balance: bool = setting(True, "curpc per class (else one global budget)")
    score: str = setting("forgetting", SCORE_HELP)
    score_path: Path | None = setting(None, "the score file (.npy, or .npz with 'scores')",
                                      shown="with a preset, its dataset's published forgetting file in the "
                                      "repository's scores/; else none: required for forgetting and cscore")
    shortfall: str = setting("fill", SHORTFALL_HELP, shown="fill; presets: short")
    coarse_pass: str = setting("lazy", "lazy (predict candidates in selection order, stop a class once full; exact) | "
                               "full (predict every candidate; --score logits always does)", resume_free=True)
    teacher_pass: str = setting("lazy", "lazy (the teacher predicts a pool image when a coarse pass first reaches it, "
                                "kept for later curricula and runs; exact) | full (every pool image before the "
                                "first curriculum; --coarse-pass full and --score logits always do)",
                                resume_free=True)

    def __post_init__(self) -> None:
        finite_fields(self)
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
        from ccfs_fast.selection.kernels import SELECTION_METHODS, SHORTFALL_POLICIES  # numba: only when checked

        check_choice("selection method", self.select_method, tuple(SELECTION_METHODS))
        check_choice("shortfall policy", self.shortfall, SHORTFALL_POLICIES)
        check_choice("coarse pass", self.coarse_pass, COARSE_PASSES)
        check_choice("teacher pass", self.teacher_pass, TEACHER_PASSES)

    @property
    def cpc(self) -> int:
        """Distilled images per class: floor(ipc * alpha)."""
        return int(self.image_per_class * self.alpha + 1e-9)

    @property
    def spc(self) -> int:
        """Real images per class to select."""
        return self.image_per_class - self.cpc


@dataclass(frozen=True)
class RunConfig:
    """`ccfs-fast run`: the CCFS curriculum (docs/design.md §1)."""

    output_dir: Path = setting(help="where the run writes everything (required: no default; created with its "
                               "parents)", resume_free=True)
    inputs: Inputs = setting(factory=Inputs)
    selection: Selection = setting(factory=Selection)
    filter_model: str = setting("resnet18", MODEL_NAMES_HELP)
    filter_acc: str = setting("end", f"{' | '.join(FILTER_ACC_LOGGING)}: filter test accuracy after the last epoch, "
                              "or the best of the last 20%% (the paper's logging)")
    evaluation: Evaluation = setting(factory=Evaluation)
    recipe: TrainRecipe = setting(factory=TrainRecipe)
    fast: FastPath = setting(factory=FastPath)
    machine: Machine = setting(factory=Machine)
    tensorboard: bool = setting(False, "per-epoch curves as TensorBoard event files too, under OUTPUT_DIR/tb/ "
                                "(curves.csv is always written); needs pip install 'ccfs-fast[tb]'", resume_free=True)
    preset: str | None = setting(None, cli=False, resume_free=True)
    smoke: bool = setting(False, cli=False)  # --smoke: a CPU-sized run (its accuracies are not meaningful, and say so)
    notes: tuple[str, ...] = setting((), cli=False)  # what the command line adjusted (printed, recorded; not a setting)

    def __post_init__(self) -> None:
        check_choice("filter accuracy logging", self.filter_acc, FILTER_ACC_LOGGING)
        if "," in self.evaluation.eval_model:
            raise ConfigError(f"--eval-model {self.evaluation.eval_model}: a run's final evaluation trains one "
                              "architecture; evaluate others afterwards with `ccfs-fast eval --run-dir RUN "
                              "--eval-model a,b,c`")
        s = self.selection
        if score_kind(s.score).from_file and s.score_path is None:
            raise ConfigError(f"--score {s.score} needs --score-path FILE (.npy or .npz)")

    def check_files(self) -> RunConfig:
        """The explicit step that reads files: every input is there (the score file of the kind --score
        names, the distilled set holding cpc images per class), TensorBoard installed when asked, CUDA
        there when asked. Returns the config."""
        from ccfs_fast.runs.curves import check_tensorboard

        check_tensorboard(self.tensorboard)
        i, s = self.inputs, self.selection
        require_betons(pool=i.pool, test=i.test, distilled=i.distilled)
        require_file(i.teacher, "--teacher", "pass the teacher checkpoint (.pt / .pth)")
        if score_kind(s.score).from_file:
            require_file(s.score_path, "--score-path", "pass the score file (.npy, or .npz with 'scores')")
            check_score_kind(s.score, s.score_path)
        check_device(self.machine.device)
        check_distilled_counts(i.distilled, s.cpc)
        return self

    def settings(self) -> dict:
        """Flat JSON-able settings: what --resume compares and exp_log.txt lists."""
        return flat_settings(self)


# Settings that may change between a run and its --resume without changing results, and those that act on
# CUDA only (left out of a CPU run's exp_log.txt): declared by their fields.
RESUME_FREE = names_where(RunConfig, "resume_free")
GPU_ONLY = names_where(RunConfig, "gpu_only")


@dataclass(frozen=True)
class EvalConfig:
    """`ccfs-fast eval`: train num_eval models on distilled ∪ a saved selection (or on an exported set)."""

    inputs: Inputs = setting(factory=Inputs)
    selection_file: Path | None = setting(None, "selected_indices.json, this tool's or the paper's",
                                          flags=("--selection",), shown="with --run-dir: the run's")
    train_set: Path | None = setting(None, "train on every image of this .beton in its order instead of distilled ∪ "
                                     "a selection: an exported set (`ccfs-fast export`); with --run-dir, the run's "
                                     "final evaluation repeated on it")
    image_per_class: int | None = setting(None, "the selection's ipc", shown="the selection file's")
    alpha: float | None = setting(None, "the selection's alpha", shown="the selection file's")
    evaluation: Evaluation = setting(factory=Evaluation)
    recipe: TrainRecipe = setting(factory=TrainRecipe)
    fast: FastPath = setting(factory=FastPath)
    machine: Machine = setting(factory=Machine)
    baseline: str | None = setting(None, "random: also train on the same distilled part plus, per class, as many real "
                                   "images as the selection holds drawn uniformly from that class's pool (seeded, "
                                   "recorded in random_indices.json), under the same labels, seeds and models",
                                   choices=BASELINES)
    baseline_seed: int | None = setting(None, "the random baseline's draw", shown="--seed")
    full_data_acc: str | None = setting(None, "the full data's hard-label test accuracy (%%), one per --eval-model: "
                                        "DD-Ranking's HLR and LRS", shown="the teacher checkpoint's recorded "
                                        "accuracy, for the teacher's own architecture")
    allow_incomplete: bool = setting(False, "evaluate a selection whose run did not finish (refused otherwise)")
    output: Path | None = setting(None, "write the results as JSON here",
                                  shown="eval.json beside the selection file, i.e. in --run-dir")
    run_dir: Path | None = setting(None, cli=False)  # the run reproduced (its accuracies are printed beside these)
    preset: str | None = setting(None, cli=False)
    notes: tuple[str, ...] = setting((), cli=False)

    def __post_init__(self) -> None:
        finite_fields(self)
        if self.train_set is not None and self.train_set != self.inputs.distilled:
            raise ConfigError("--train-set trains on that .beton alone; it takes the place of --distilled")
        if self.baseline is not None and self.train_set is not None:
            raise ConfigError("--baseline random draws as many real images per class as a selection holds; it needs "
                              "--selection (or --run-dir), not --train-set")
        full = self.full_data_accs
        if full and len(full) != len(self.eval_models):
            raise ConfigError(f"--full-data-acc gives {len(full)} accuracies for {len(self.eval_models)} --eval-model "
                              "architectures; give one per architecture, in the same order")

    @property
    def eval_models(self) -> list[str]:
        """The architectures to evaluate on: --eval-model a,b,c (a cross-architecture matrix)."""
        return [m.strip() for m in self.evaluation.eval_model.split(",") if m.strip()]

    @property
    def full_data_accs(self) -> list[float]:
        """--full-data-acc as numbers (%), one per architecture; [] when not given."""
        if self.full_data_acc is None:
            return []
        try:
            values = [float(v) for v in str(self.full_data_acc).split(",")]
        except ValueError:
            raise ConfigError(f"--full-data-acc {self.full_data_acc}: expected accuracies in %, e.g. 95.1 or "
                              "95.1,93.8") from None
        if not all(0 <= v <= 100 for v in values):
            raise ConfigError(f"--full-data-acc {self.full_data_acc}: accuracies lie in [0, 100] (%)")
        return values

    def check_files(self) -> EvalConfig:
        """The explicit step that reads files (see RunConfig.check_files). Returns the config."""
        i = self.inputs
        require_betons(pool=i.pool, test=i.test, distilled=i.distilled)
        require_file(i.teacher, "--teacher", "pass the teacher checkpoint (.pt / .pth)")
        if self.train_set is None:
            require_file(self.selection_file, "--selection", "pass a selected_indices.json (or --run-dir RUN)")
        check_device(self.machine.device)
        return self


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
        check_choice("export format", self.format, EXPORT_FORMATS)
        if self.run_dir.resolve() in self.out.resolve().parents:
            raise ConfigError(f"--out {self.out} lies inside the run directory; export next to it instead")

    def check_files(self) -> ExportConfig:
        """The explicit step that reads files: the run directory holds a run; an existing --out needs
        --overwrite. Returns the config."""
        if not (self.run_dir / "state.json").is_file():
            raise ConfigError(f"{self.run_dir} has no state.json; pass the --output-dir of a `ccfs-fast run`")
        if self.out.exists() and not self.overwrite:
            raise ConfigError(f"{self.out} already exists; pass --overwrite to replace an earlier export, or choose "
                              "another --out")
        return self


def teacher_recipe() -> TrainRecipe:
    """A standard supervised recipe for teachers: SGD lr 0.1, wd 5e-4, cosine, batch 128, 200 epochs."""
    return TrainRecipe(epochs=200, lr=0.1, weight_decay=5e-4, lr_warmup_epochs=0, batch_size=128)


@dataclass(frozen=True)
class TeacherConfig:
    """`ccfs-fast teacher`: supervised training on a pool .beton, optional forgetting scores."""

    output: Path = setting(help="checkpoint FILE.pt (records arch and normalisation)")
    inputs: Inputs = setting(factory=Inputs)
    model: str = setting("resnet18", MODEL_NAMES_HELP)
    forgetting_out: Path | None = setting(None, "write forgetting scores (.npy) here")
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing")
    recipe: TrainRecipe = setting(factory=teacher_recipe)
    fast: FastPath = setting(factory=FastPath)
    machine: Machine = setting(factory=Machine)
    overwrite: bool = setting(False, "replace existing output files")
    tensorboard: bool = setting(False, "per-epoch curves as TensorBoard event files too, in OUTPUT.tb/ (teacher.pt: "
                                "teacher.tb/; the curves CSV, teacher.curves.csv, is always written); needs pip "
                                "install 'ccfs-fast[tb]'")
    notes: tuple[str, ...] = setting((), cli=False)

    def __post_init__(self) -> None:
        finite_fields(self)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.output.suffix not in (".pt", ".pth"):
            raise ConfigError(f"--output must be a .pt or .pth file, got {self.output}")
        if self.forgetting_out is not None and self.forgetting_out.suffix != ".npy":  # --overwrite replaces it
            raise ConfigError(f"--forgetting-out must be a .npy file, got {self.forgetting_out}")

    def check_files(self) -> TeacherConfig:
        """The explicit step that reads files (see RunConfig.check_files). Returns the config."""
        from ccfs_fast.runs.curves import check_tensorboard

        check_tensorboard(self.tensorboard)
        require_betons(pool=self.inputs.pool, test=self.inputs.test)
        check_device(self.machine.device)
        for path in (self.output, self.forgetting_out):
            if path is not None and path.exists() and not self.overwrite:
                raise ConfigError(f"{path} already exists; pass --overwrite to replace it")
        return self

    @property
    def curves_path(self) -> Path:
        """The teacher's per-epoch curves: `teacher.pt` -> `teacher.curves.csv`."""
        return self.output.with_suffix(".curves.csv")


def fit_warmup(recipe: dict, base: TrainRecipe) -> tuple[dict, list[str]]:
    """Clamps a warm-up that does not fit the epochs (e.g. the default 5 with --epochs 2) to
    epochs - 1, so short smoke runs just work; returns the settings and the printed note."""
    epochs = recipe.get("epochs", base.epochs)
    warmup = recipe.get("lr_warmup_epochs", base.lr_warmup_epochs)
    if epochs < 1 or warmup < epochs:
        return recipe, []
    note = (f"note: --lr-warmup-epochs {warmup} does not fit --epochs {epochs}; using {epochs - 1} warm-up "
            f"epoch{'s' if epochs - 1 != 1 else ''}")
    return {**recipe, "lr_warmup_epochs": epochs - 1}, [note]
