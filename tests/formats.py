"""Writers of small datasets in the exact published on-disk formats (test data; no downloads).

Written independently of beton_builder's readers so the tests check the readers against the
formats themselves: CIFAR pickles (protocol 2, bytes keys) and tarballs, the tiny-imagenet-200 tree
with JPEGs and its zip, an ImageFolder of PNGs, an arrays .npz.
"""
from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def class_images(n: int, num_classes: int, side: int, seed: int, separation: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, side, side, 3] random images whose mean colour depends on the class (the same
    class colours for every seed, so a train and a test split share them; a larger `separation`
    makes classes easier to tell apart); labels [n]."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    base = np.random.default_rng(12345).integers(128 - separation, 128 + separation, (num_classes, 1, 1, 3))
    noise = rng.integers(-110, 111, (n, side, side, 3))  # classes overlap: not every image is easy
    images = np.clip(base[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_cifar10(root: Path, train: tuple, test: tuple, names: list[str] | None = None) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    x, y = train
    for b, idx in enumerate(np.array_split(np.arange(len(x)), 5), 1):
        _dump(folder / f"data_batch_{b}", {b"batch_label": f"training batch {b} of 5".encode(),
                                           b"labels": [int(v) for v in y[idx]], b"data": _flat(x[idx]),
                                           b"filenames": [b"f%d.png" % i for i in idx]})
    _dump(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test[1]],
                                  b"data": _flat(test[0]), b"filenames": [b"t.png"] * len(test[0])})
    names = names or [f"class{i}" for i in range(10)]
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in names],
                                    b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return folder


def write_cifar100(root: Path, train: tuple, test: tuple) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, (x, y) in (("train", train), ("test", test)):
        _dump(folder / name, {b"filenames": [b"f.png"] * len(x), b"batch_label": name.encode(),
                              b"fine_labels": [int(v) for v in y], b"coarse_labels": [int(v) // 5 for v in y],
                              b"data": _flat(x)})
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


def _flat(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3072).copy()


def _dump(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_tiny_imagenet(root: Path, wnids: list[str], per_class: int, val_per_class: int, side: int = 64,
                        seed: int = 0) -> tuple[Path, dict]:
    """Writes root/tiny-imagenet-200 like the published tree; returns it and the expected arrays
    (decoded back from the JPEGs, in canonical order)."""
    top = root / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    (top / "val" / "images").mkdir(parents=True)
    # wnids.txt in the published file is not sorted: the reader must sort it.
    (top / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    train_x, train_y = [], []
    for label, wnid in enumerate(sorted(wnids)):
        images_dir = top / "train" / wnid / "images"
        images_dir.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        names = sorted(f"{wnid}_{k}.JPEG" for k in range(per_class))  # _0, _1, _10, ... string order
        for name in names:
            img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            mode = "L" if name.endswith("_1.JPEG") else "RGB"  # Tiny-ImageNet has grayscale JPEGs
            Image.fromarray(img).convert(mode).save(images_dir / name, quality=95)
            train_x.append(np.asarray(Image.open(images_dir / name).convert("RGB")))
            train_y.append(label)
    lines, val = [], []
    for k in range(val_per_class * len(wnids)):
        name = f"val_{k}.JPEG"
        wnid = wnids[rng.integers(len(wnids))]
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(top / "val" / "images" / name)
        lines.append(f"{name}\t{wnid}\t0\t0\t{side - 1}\t{side - 1}")
        val.append((name, sorted(wnids).index(wnid)))
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    val.sort()
    val_x = [np.asarray(Image.open(top / "val" / "images" / n).convert("RGB")) for n, _ in val]
    expected = {"train": (np.stack(train_x), np.array(train_y)),
                "test": (np.stack(val_x), np.array([lab for _, lab in val]))}
    return top, expected


def make_zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for dirpath, _, files in os.walk(folder):
            for f in files:
                full = Path(dirpath) / f
                zf.write(full, full.relative_to(folder.parent))
    return archive


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> Path:
    """One PNG per image in root/<class name>/img_<k>.png (k zero-padded: sorted = written order)."""
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = root / names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:05d}.png")
    return root


IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def write_ilsvrc(root: Path, wnids: list[str], per_class: int, val_per_class: int, val_layout: str,
                 seed: int = 0) -> dict:
    """Writes an ILSVRC-2012 tree at root: train/<wnid>/<wnid>_<k>.JPEG (varying sizes; one grayscale
    and one CMYK JPEG per class, as the real set has a few) and val in `val_layout`: `loc` (flat
    ILSVRC2012_val_<8 digits>.JPEG + LOC_val_solution.csv, rows shuffled), `devkit` (flat +
    ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt and meta.mat, whose
    ILSVRC2012_IDs are NOT in sorted-wnid order) or `folders` (val/<wnid>/*.JPEG). Class colours
    follow class_images. Returns {"val_wnids": wnid of each val image in sorted file order}."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(12345).integers(96, 160, (len(wnids), 1, 1, 3))

    def image(c: int) -> Image.Image:  # class colour, a smooth random gradient, mild noise
        h, w = rng.integers(24, 72, 2)
        ramp = np.linspace(-1, 1, h)[:, None, None] * rng.integers(-30, 31, 3) \
            + np.linspace(-1, 1, w)[None, :, None] * rng.integers(-30, 31, 3)
        noise = rng.integers(-6, 7, (h, w, 3))
        return Image.fromarray(np.clip(base[c] + ramp + noise, 0, 255).astype(np.uint8))

    for c, wnid in enumerate(wnids):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for k in range(per_class):
            # file numbers not in creation order: the reader must sort names (as strings)
            img = image(c).convert("L" if k == 1 else "CMYK" if k == 2 else "RGB")
            img.save(folder / f"{wnid}_{(k * 7919) % 10007}.JPEG", quality=95)
    count = val_per_class * len(wnids)
    val_wnids = [wnids[int(c)] for c in rng.permutation(np.repeat(np.arange(len(wnids)), val_per_class))]
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(count)]
    for name, wnid in zip(names, val_wnids):
        folder = root / "val" / (wnid if val_layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        image(wnids.index(wnid)).save(folder / f"{name}.JPEG", quality=95)
    if val_layout == "loc":
        rows = [f"{n},{w} 10 20 30 40 {w} 5 5 9 9" for n, w in zip(names, val_wnids)]
        rng.shuffle(rows)
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif val_layout == "devkit":
        from scipy.io import savemat

        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        ids = {w: i + 1 for i, w in enumerate(reversed(wnids))}  # the devkit's ids follow its own order
        synsets = np.zeros(len(wnids) + 1, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
        for i, w in enumerate(wnids):
            synsets[i] = (ids[w], w, 0)
        synsets[-1] = (len(wnids) + 1, "n00001740", 3)  # an inner node, as meta.mat lists them too
        savemat(str(data / "meta.mat"), {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(ids[w]) for w in val_wnids) + "\n")
    return {"val_wnids": val_wnids}


# The normalisation MTT's get_dataset applies to CIFAR-10 (what images_best.pt files of that family hold).
MTT_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def write_tensor_pair(root: Path, images: np.ndarray, labels: np.ndarray, norm: tuple = MTT_CIFAR10,
                      soft_classes: int | None = None) -> tuple[Path, Path]:
    """images_best.pt (float32 [N, 3, H, W], normalised with `norm`) and labels_best.pt (int64 [N], or
    soft labels float32 [N, soft_classes] whose argmax is the label), as trajectory-matching code saves them."""
    import torch

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in norm)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y = torch.from_numpy(np.asarray(labels, np.int64))
    if soft_classes is not None:
        y = torch.nn.functional.one_hot(y, soft_classes).float() * 4 + torch.rand(len(y), soft_classes)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(x, root / "images_best.pt")
    torch.save(y, root / "labels_best.pt")
    return root / "images_best.pt", root / "labels_best.pt"


def write_hub_parquet(root: Path, images: list[np.ndarray], labels: np.ndarray, class_names: list[str] | None,
                      shards: int = 2, image_format: str = "PNG", label_column: str = "label",
                      split: str = "train", label_dtype: type = np.int64) -> Path:
    """A Hugging Face Hub dataset's local layout: root/data/<split>-0000k-of-0000N.parquet, an `image`
    column (struct of the encoded `bytes` and a `path`), an integer label column and, with class names,
    the Hub's features metadata (a ClassLabel); small row groups, so readers cross them."""
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    label_feature = {"names": class_names, "_type": "ClassLabel"} if class_names else {"dtype": "int64",
                                                                                         "_type": "Value"}
    meta = {"info": {"features": {"image": {"_type": "Image"}, label_column: label_feature}}}
    for k, rows in enumerate(np.array_split(np.arange(len(images)), shards)):
        blobs = []
        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format=image_format)
            blobs.append({"bytes": buf.getvalue(), "path": f"img_{i:05d}.{image_format.lower()}"})
        table = pa.table({"image": pa.array(blobs, type=image_type),
                          label_column: pa.array(np.asarray(labels)[rows].astype(label_dtype))})
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
        pq.write_table(table, folder / f"{split}-{k:05d}-of-{shards:05d}.parquet", row_group_size=3)
    return root
