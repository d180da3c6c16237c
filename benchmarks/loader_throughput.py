"""Train-input throughput: the ccfs-fast train loader vs the paper's input paths.

Same machine, same worker count, same batch size; images/s of batches that are augmented
(RandomResizedCrop + flip) and normalised, ready for the model:
  - ccfs-fast: ResidentTrainLoader (FFCV read once, resident uint8, batched crop/flip on device);
    its one-time read + FFCV JIT compile is reported separately, not in the rate;
  - tensordataset: float tensors in a TensorDataset, per-sample torchvision RandomResizedCrop +
    flip + Normalize, torch DataLoader (the paper's path for selected images);
  - imagefolder_png: PNG ImageFolder with PIL transforms (the paper's path for distilled images).
Run: `ccfs-fast bench loader [--quick] [--json FILE]`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from beton_builder.base.processes import available_cpus
from beton_builder.base.tables import format_table
from beton_builder.beton import BetonFile
from beton_builder.table import ImageTable
from beton_builder.writer import write_beton
from ccfs_fast.data.loaders import ResidentTrainLoader
from ccfs_fast.data.space import IndexSpace

from .baseline_paper import SelectedTensors
from .common import HelpFormatter, competing_load, median_time, write_chart, write_rows


def synthetic_images(n: int, side: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return images, labels.astype(np.int64)


def paper_transforms(side: int, mean: tuple, std: tuple, from_pil: bool):
    steps = [transforms.RandomResizedCrop(side, antialias=True), transforms.RandomHorizontalFlip()]
    if from_pil:
        steps.append(transforms.ToTensor())
    return transforms.Compose([*steps, transforms.Normalize(mean, std)])


def epoch_rate(loader, n: int, repeats: int, warmup: int = 1) -> float:
    """Median images/s of full passes over `loader` (`warmup` untimed passes first)."""
    def one_epoch():
        for batch in loader:
            _ = batch[0]
    return n / median_time(one_epoch, repeats, warmup)


def measure_side(side: int, n: int, batch_sizes: list[int], workers: int, repeats: int, root: Path) -> list[dict]:
    images, labels = synthetic_images(n, side, 10, seed=side)
    table = ImageTable(images, labels, tuple(str(i) for i in range(10)), "arrays", "synthetic")
    beton_path = root / f"bench_{side}.beton"
    manifest = write_beton(table, beton_path, overwrite=True, workers=workers)
    folder = root / f"png_{side}"
    for i, (img, lab) in enumerate(zip(images, labels)):
        (folder / str(lab)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / str(lab) / f"{i:06d}.png")
    space = IndexSpace(BetonFile.open(beton_path))
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    rows = []
    for batch_size in batch_sizes:
        start = time.perf_counter()
        ccfs = ResidentTrainLoader(space, np.arange(n), batch_size, "cpu", seed=0, workers=workers)
        setup_s = time.perf_counter() - start
        ccfs_rate = epoch_rate(ccfs, n, repeats)
        baselines = {
            "tensordataset": SelectedTensors(tensors, torch.from_numpy(labels),
                                                paper_transforms(side, manifest.mean, manifest.std, False)),
            "imagefolder_png": datasets.ImageFolder(str(folder),
                                                    paper_transforms(side, manifest.mean, manifest.std, True)),
        }
        for name, dataset in baselines.items():
            # As the paper's code builds it: RandomSampler, worker processes started every epoch.
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                persistent_workers=False, drop_last=False)
            rate = epoch_rate(loader, n, repeats)
            rows.append({"side": side, "baseline": name, "batch_size": batch_size, "images": n,
                         "workers": workers, "baseline_img_per_s": rate, "ccfs_img_per_s": ccfs_rate,
                         "speedup": ccfs_rate / rate, "ccfs_setup_s": setup_s})
            del loader
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="ccfs-fast bench loader", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64], help="image sides in pixels")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 32], help="batch sizes")
    parser.add_argument("--images", type=int, default=5000, help="train-set size (a phase's ipc x classes)")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="FFCV reader threads and DataLoader worker processes (the CPUs available)")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs (median) after one warm-up")
    parser.add_argument("--quick", action="store_true", help="1,000 images, 32x32, batch 128, 2 repeats")
    parser.add_argument("--under-load", action="store_true",
                        help="measure every row again with one busy CPU job per available CPU running, started "
                             "by the benchmark, and report how much of its idle speedup each row keeps")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.sides, args.batch_sizes, args.images, args.repeats = [32], [128], 1000, 2
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["json"] = str(args.json) if args.json else None
    with tempfile.TemporaryDirectory(prefix="ccfs-bench-") as tmp:
        rows = [{**row, "load": "idle"} for side in args.sides
                for row in measure_side(side, args.images, args.batch_sizes, args.workers, args.repeats, Path(tmp))]
        if args.under_load:
            with competing_load() as jobs:
                busy = [{**row, "load": f"{jobs} busy jobs"} for side in args.sides
                        for row in measure_side(side, args.images, args.batch_sizes, args.workers, args.repeats,
                                                Path(tmp))]
            for idle, row in zip(list(rows), busy):
                row["speedup_kept"] = row["speedup"] / idle["speedup"]  # target: at least 0.5
            rows += busy
    write_rows(args.json, rows, config)
    write_chart(args.json, [f"{r['side']}px b{r['batch_size']} vs {r['baseline']}" for r in rows],
                [r["speedup"] for r in rows], "train loader images/s: ccfs-fast vs the paper's input paths", 10.0)
    print(format_table(["side", "batch", "baseline", "load", "baseline img/s", "ccfs-fast img/s", "speedup",
                        "kept under load", "ccfs setup s"],
                       [(f"{r['side']}x{r['side']}", r["batch_size"], r["baseline"], r["load"], r["baseline_img_per_s"],
                         r["ccfs_img_per_s"], f"{r['speedup']:.1f}x",
                         f"{r['speedup_kept']:.2f}" if "speedup_kept" in r else "", r["ccfs_setup_s"]) for r in rows]))
    return rows


if __name__ == "__main__":
    main()
