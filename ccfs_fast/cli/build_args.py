"""`ccfs-fast build`'s sub-commands and flags."""
from __future__ import annotations

import argparse
from pathlib import Path

from ccfs_fast.cli.args import (
    default_workers,
)
from ccfs_fast.cli.commands import _run_build


def _add_build(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build", help="convert a dataset to .beton files (+ manifests), once")
    kinds = build.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("cifar10", "cifar100", "tiny-imagenet"):
        p = kinds.add_parser(kind, help=f"{kind}: writes {kind}_train.beton and {kind}_test.beton")
        p.add_argument("--src", type=Path, required=True, help="the dataset folder or its downloaded archive")
        p.add_argument("--out", type=Path, required=True, help="output folder")
    folder = kinds.add_parser("folder", help="an image folder (one sub-folder per class), e.g. distilled images")
    folder.add_argument("--src", type=Path, required=True, help="the folder (ImageFolder layout)")
    folder.add_argument("--out", type=Path, required=True, help="FILE.beton")
    folder.add_argument("--per-class", type=int, default=None,
                        help="keep the first K sorted files per class (default: all)")
    folder.add_argument("--side", type=int, default=None,
                        help="resize every image to SIDE x SIDE (default: keep; all must share one square size)")
    folder.add_argument("--class-order", choices=("sorted", "numeric"), default=None,
                        help="label order of the class folders: sorted (torchvision's and the paper's) or numeric; "
                             "required when integer folder names sort otherwise (0, 1, 10, 2, ...) (default: sorted)")
    folder.add_argument("--classes-like", type=Path, default=None, metavar="POOL.beton",
                        help="take the class names and their label order from this .beton (the pool): each folder "
                             "named as one of its classes, in any order, or with its label index (default: the "
                             "folders' sorted order; an export's classes.csv when the folder holds one)")
    imagenet = kinds.add_parser("imagenet", help="ILSVRC-2012 train + val folders: writes imagenet_train.beton and "
                                "imagenet_test.beton (JPEG, images of varying size; resumes after an interruption)")
    imagenet.add_argument("--src", type=Path, required=True,
                          help="ROOT holding train/<wnid>/*.JPEG and val/ (wnid folders, or flat with "
                               "LOC_val_solution.csv or the devkit ILSVRC2012_devkit_t12/)")
    imagenet.add_argument("--out", type=Path, required=True, help="output folder")
    _add_jpeg_flags(imagenet)
    arrays = kinds.add_parser("arrays", help="an .npz with x uint8 [n,h,w,3] and y int [n]")
    arrays.add_argument("--src", type=Path, required=True, help="FILE.npz")
    arrays.add_argument("--out", type=Path, required=True, help="FILE.beton")
    _add_tensors(kinds)
    _add_parquet(kinds)
    for name in ("folder", "parquet"):
        _add_jpeg_flags(kinds.choices[name])
    for p in kinds.choices.values():
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
        p.add_argument("--workers", type=int, default=default_workers(),
                       help=f"decoding / writing processes (default: {default_workers()})")
    build.set_defaults(handler=_run_build)


def _add_jpeg_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-side", type=int, default=None,
                   help="images stored as JPEG (of varying size): shrink those whose longer side exceeds this many "
                        "pixels (default: 500, as FFCV's ImageNet example)")
    p.add_argument("--jpeg-quality", type=int, default=None, help="JPEG quality 1-100 (default: 90)")


def _add_tensors(kinds: argparse._SubParsersAction) -> None:
    from beton_builder.tensors import NORMALIZATIONS

    p = kinds.add_parser("tensors", help="a distilled set saved with torch.save (MTT / FTD / TESLA / DATM / "
                         "DD-Ranking: images_best.pt, labels_best.pt)")
    p.add_argument("--images", dest="src", type=Path, required=True,
                   help="float images [N, 3, H, W] (or a dict / tuple holding images and labels)")
    p.add_argument("--labels", type=Path, default=None,
                   help="labels [N] (integers) or [N, C] (soft labels: their argmax) (default: in --images)")
    p.add_argument("--out", type=Path, required=True, help="FILE.beton")
    p.add_argument("--normalized-with", required=True, choices=list(NORMALIZATIONS),
                   help="the mean / std the images were normalised with, as the distillation code's get_dataset "
                        "has them (cifar100: 0.5071/0.2673..., tiny-imagenet and imagenet: ImageNet's); none: "
                        "pixels in [0, 1]. ZCA-whitened sets cannot be undone")
    p.add_argument("--classes", type=int, default=None,
                   help="the class count (default: the largest label + 1, or the soft labels' width)")


def _add_parquet(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("parquet", help="Hugging Face Hub parquet shards (an image column and a label column)")
    p.add_argument("--src", type=Path, nargs="+", required=True,
                   help="a folder of shards (data/train-*.parquet) or the shard files, in order")
    p.add_argument("--out", type=Path, required=True, help="FILE.beton")
    p.add_argument("--image-column", default="image", help="(default: image)")
    p.add_argument("--label-column", default=None,
                   help="(default: the ClassLabel column, else label, labels, fine_label, class_id, ...)")
    p.add_argument("--split", default=None,
                   help="the split's shards when the folder holds several, e.g. test (default: train)")
    p.add_argument("--class-order", choices=("sorted", "numeric"), default=None,
                   help="labels given as class-name strings: their label order (default: sorted)")
