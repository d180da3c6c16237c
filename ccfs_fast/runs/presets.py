"""The paper's published settings per dataset and IPC, --smoke, and RunConfig as `run` makes it from them."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from beton_builder.base.errors import ConfigError, UnknownNameError
from ccfs_fast.runs.config import RunConfig, Selection, fit_warmup
from ccfs_fast.selection.scores import SCORES_DIR
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.settings import check_finite, compose, leaves

# The paper's published script settings (github_scripts/*.sh of the CCFS repository) per dataset and
# IPC. Shared by all: T=20, SGD lr 0.2 momentum 0.9 wd 1e-4, cosine after 5 linear warm-up epochs from
# 0.01, 3 curricula, misclassified, simple, balanced, forgetting score, 5 evaluations, resnet18 (the
# paper's network), and a class left short when it runs out of candidates, as the paper's code does.
_PAPER_COMMON = {"temperature": 20.0, "opt": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4,
                 "lr_scheduler": "cosineannealinglr", "lr_warmup_epochs": 5, "lr_warmup_method": "linear",
                 "lr_warmup_decay": 0.01, "curriculum_num": 3, "select_misclassified": True,
                 "select_method": "simple", "balance": True, "score": "forgetting", "num_eval": 5,
                 "filter_model": "resnet18", "eval_model": "resnet18", "shortfall": "short"}


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
    from beton_builder.base.errors import CCFSError
    from beton_builder.manifest import read_manifest

    notes: list[str] = []
    try:
        distilled, pool = read_manifest(values["distilled"]), read_manifest(values["pool"])
    except (CCFSError, KeyError, TypeError):
        return values, notes  # RunConfig names what is missing
    defaults = Selection()
    alpha = values.get("alpha", defaults.alpha)
    ipc = values.get("image_per_class", defaults.image_per_class)
    curricula = values.get("curriculum_num", defaults.curriculum_num)
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


def path_settings(config: type) -> frozenset[str]:
    """The settings of `config` that are paths (given as str or Path)."""
    return frozenset(leaf.name for leaf in leaves(config) if leaf.type in (Path, Path | None))


def make_config(config: type, **settings: object) -> object:
    """A command's config (EvalConfig, TeacherConfig, ExportConfig, RunConfig without a preset) from
    flat settings: every setting of its parts by name, paths as str or Path, e.g.
    make_config(EvalConfig, pool=..., test=..., distilled=..., teacher=..., selection_file=...,
    labels="hard"). A name no part holds is refused, naming the valid ones. A warm-up longer than the
    epochs is shortened as the CLI does (a note in the config's notes). Its files are checked."""
    check_finite(settings)
    paths = path_settings(config)
    values = {k: Path(v) if k in paths and v is not None else v for k, v in settings.items()}
    recipe = next((f.default_factory() for f in fields(config) if f.name == "recipe"), None)
    notes: list[str] = []
    if recipe is not None:
        values, notes = fit_warmup(values, recipe)
    return compose(config, {**values, "notes": tuple(notes)}).check_files()


def make_run_config(preset: str | None = None, smoke: bool = False, **settings: object) -> RunConfig:
    """A RunConfig as `ccfs-fast run` makes it: the preset's settings (or the defaults), --smoke's CPU
    size and fitting (smoke_fit), the preset's published scores when no --score-path is given, then
    `settings` (flat: every setting of RunConfig's parts by name) over them; every adjustment is in the
    config's notes. Its files are checked (RunConfig.check_files)."""
    check_finite(settings)  # before --smoke's fitting does arithmetic with them
    paths = {k: Path(v) for k, v in settings.items() if k in RUN_PATHS and v is not None}  # str or Path
    values, notes = published_scores(preset, {**preset_settings(preset), **(SMOKE if smoke else {}), **settings,
                                              **paths})
    if smoke:
        values, fitted = smoke_fit(values, published=bool(notes))
        notes += fitted
    values, warmup = fit_warmup({**values, "preset": preset, "smoke": smoke}, TrainRecipe())
    cfg = compose(RunConfig, {**values, "notes": tuple(notes + warmup)})
    return cfg.check_files()

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


def preset_settings(name: str | None, command: type | None = None) -> dict:
    """The preset's flat settings; with `command` (a config class), only those it takes (for `eval`:
    the recipe, T, models, num_eval; the selection file keeps its own ipc and alpha)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise UnknownNameError("preset", name, list(PRESETS))
    values = dict(PRESETS[name])
    if command is not None:
        own = {leaf.name for leaf in leaves(command)} - {"image_per_class", "alpha"}
        values = {k: v for k, v in values.items() if k in own}
    return values
