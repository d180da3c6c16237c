"""selection.png: what CCFS picked, as pictures. One row per class (at most MAX_CLASSES): the class
name, a few of the distilled images the run started from, then the real images each curriculum
selected for that class in the order chosen (easiest first), curricula separated and labelled, with
the count not shown. Thumbnails come from the .beton files (raw pixels, or JPEG images decoded at
thumbnail size)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from beton_builder.base.errors import ConfigError
from beton_builder.base.files import atomic_file
from ccfs_fast.runs.runset import RunSet, images, open_run_set

MAX_CLASSES = 10
DISTILLED_SHOWN = 4
PER_CURRICULUM = 8
GAP, SECTION = 2, 14  # pixels between thumbnails, and between sections (distilled | curriculum k)


def thumb_side(run: RunSet) -> int:
    """Thumbnails are drawn at the images' side (pixel-exact for small images), 96 px at most."""
    return int(min(96, max(32, run.pool.manifest.side if not run.pool.manifest.variable_size else 96)))


def thumbnail(image: np.ndarray | bytes, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: the image scaled to fit (nearest for small raw images, kept sharp) and
    centred on grey."""
    from PIL import Image

    if isinstance(image, bytes):
        picture = Image.open(io.BytesIO(image))
        picture.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
        picture = picture.convert("RGB")
    else:
        picture = Image.fromarray(image)
    scale = side / max(picture.size)
    size = (max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale)))
    resample = Image.Resampling.NEAREST if isinstance(image, np.ndarray) and scale >= 1 else Image.Resampling.BILINEAR
    picture = picture.resize(size, resample)
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    canvas.paste(picture, ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(canvas)


def chosen_classes(run: RunSet, wanted: list[str] | None) -> list[int]:
    """The classes to show: `wanted` by name or label (ConfigError naming the valid ones), else the first."""
    names = run.class_names
    if not wanted:
        return list(range(min(MAX_CLASSES, len(names))))
    out = []
    for item in wanted:
        if item in names:
            out.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            out.append(int(item))
        else:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ConfigError(f"--classes {item}: no such class; give names ({shown}) or labels 0..{len(names) - 1}")
    if len(out) > MAX_CLASSES:
        raise ConfigError(f"--classes: at most {MAX_CLASSES} classes fit one figure, got {len(out)}")
    return out


def layout(run: RunSet, classes: list[int]) -> tuple[dict, dict, list[int]]:
    """({class: distilled rows shown}, {(class, curriculum): (selected positions shown, not shown)}, curricula)."""
    curricula = sorted(set(run.curriculum.tolist())) or [1]
    distilled = {c: run.distilled_rows[run.distilled_labels == c][:DISTILLED_SHOWN] for c in classes}
    picked = {}
    for c in classes:
        for k in curricula:
            mine = np.flatnonzero((run.selected_labels == c) & (run.curriculum == k))  # in the order chosen
            picked[c, k] = (mine[:PER_CURRICULUM], max(0, len(mine) - PER_CURRICULUM))
    return distilled, picked, curricula


def write_selection_figure(run_dir: Path, out: Path, wanted: list[str] | None = None,
                           given: dict[str, Path] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = open_run_set(run_dir, given)
    classes = chosen_classes(run, wanted)
    distilled, picked, curricula = layout(run, classes)
    side = thumb_side(run)
    step = side + GAP
    widest = [max(1, max(len(distilled[c]) for c in classes))] + \
        [max(3, max(len(picked[c, k][0]) for c in classes)) for k in curricula]  # room for the header
    section_w = [count * step for count in widest]
    starts = np.concatenate([[0], np.cumsum(np.asarray(section_w) + SECTION)[:-1]])
    width, height = int(starts[-1] + section_w[-1]), len(classes) * step
    canvas = np.full((height, width, 3), 255, np.uint8)

    def put(row: int, x: int, image) -> None:
        canvas[row * step:row * step + side, x:x + side] = thumbnail(image, side)

    d_rows = np.concatenate([distilled[c] for c in classes])
    slots = [(r, int(starts[0]) + i * step) for r, c in enumerate(classes) for i in range(len(distilled[c]))]
    for (r, x), image in zip(slots, images(run.distilled, d_rows)):
        put(r, x, image)
    shown = [(r, int(starts[n + 1]) + i * step, j) for r, c in enumerate(classes) for n, k in enumerate(curricula)
             for i, j in enumerate(picked[c, k][0])]
    for (r, x, _), image in zip(shown, images(run.pool, run.selected[[j for _, _, j in shown]])):
        put(r, x, image)
    dpi = 100
    fig = plt.figure(figsize=((width + 160) / dpi, (height + 110) / dpi), dpi=dpi)
    ax = fig.add_axes([140 / (width + 160), 20 / (height + 110), width / (width + 160), height / (height + 110)])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    for r, c in enumerate(classes):
        ax.text(-8, r * step + side / 2, run.class_names[c], ha="right", va="center", fontsize=9)
        for k in curricula:
            more = picked[c, k][1]
            if more:
                x = starts[curricula.index(k) + 1] + section_w[curricula.index(k) + 1]
                ax.text(x - 2, r * step + side - 3, f"+{more}", ha="right", va="bottom", fontsize=7, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    headers = ["distilled"] + [f"curriculum {k}\n(easiest first)" for k in curricula]
    for x, w, text in zip(starts, section_w, headers):
        ax.text(x + w / 2, -6, text, ha="center", va="bottom", fontsize=8, fontweight="bold")
    for x in starts[1:]:
        ax.axvline(x - SECTION / 2, color="black", linewidth=1)
    fig.suptitle(f"what CCFS selected: run {run_dir.name}", fontsize=10, x=0.01, ha="left", y=0.995, va="top")
    with atomic_file(out, ".png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return out
