"""Fidelity to the paper's code (design §1.0): normalisation constants, batch-size rule per dataset,
the paper's model names, presets that leave a class short, torchvision reference checkpoints.

The "paper pipeline" teacher here is trained in plain torch/torchvision on the CIFAR pickles
themselves (not through ccfs-fast), with the paper's constants, and saved as torchvision's
reference scripts save checkpoints (with an argparse `args`)."""
from __future__ import annotations

import argparse
import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
from conftest import inputs_of, run_args
from formats import write_cifar10, write_image_folder

from beton_builder.base.digests import file_sha256
from beton_builder.base.errors import ModelError
from ccfs_fast.cli import main
from ccfs_fast.data.datasets import CIFAR_MEAN, CIFAR_STD, TINY_MEAN, auto_batch_size
from ccfs_fast.data.loaders import ResidentTrainLoader
from ccfs_fast.runs.config import EvalConfig, Machine, Selection
from ccfs_fast.runs.presets import EXTRAPOLATED, PRESETS, preset_settings
from ccfs_fast.runs.teacher_pass import teacher_correct
from ccfs_fast.runs.workspace import open_workspace
from ccfs_fast.train.models import create_model, read_checkpoint

POOL, TEST = 600, 200


def dim_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [n, 32, 32, 3] far from CIFAR's statistics (mean about 0.2, std about 0.1): a class
    colour (10 classes) plus a class-dependent bar and noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    base = np.random.default_rng(7).integers(15, 90, (10, 3))
    images = base[labels][:, None, None, :] + rng.normal(0, 12, (n, 32, 32, 3))
    for c in range(10):
        images[labels == c, :, 3 * c:3 * c + 3, :] += 40
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def unpickle_cifar(folder) -> tuple[np.ndarray, np.ndarray]:
    """The pool exactly as the paper's code reads it (torchvision CIFAR10): data_batch_1..5."""
    xs, ys = [], []
    for b in range(1, 6):
        with open(folder / f"data_batch_{b}", "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(batch[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[b"labels"]))
    return np.concatenate(xs), np.concatenate(ys)


def paper_resnet18() -> torch.nn.Module:
    """The paper's create_model('resnet18'), written out with torchvision alone."""
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def paper_tensors(x: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize(CIFAR constants), as the paper's transforms do."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def paper_files(tmp_path_factory):
    """CIFAR-10 pickles far from CIFAR's statistics, their .beton files, a distilled folder, and a
    resnet18 teacher trained the paper pipeline's way and saved with torchvision's `args`."""
    root = tmp_path_factory.mktemp("paper")
    pool, test = dim_images(POOL, 1), dim_images(TEST, 2)
    folder = write_cifar10(root / "src", pool, test)
    dx, _ = dim_images(40, 3)
    write_image_folder(root / "distilled", dx, np.repeat(np.arange(10), 4), [f"c{i}" for i in range(10)])
    betons = root / "betons"
    assert main(["build", "cifar10", "--src", str(root / "src"), "--out", str(betons)]) == 0
    assert main(["build", "folder", "--src", str(root / "distilled"), "--out", str(betons / "d.beton")]) == 0

    x, y = unpickle_cifar(folder)
    torch.manual_seed(0)
    model = paper_resnet18()
    images, labels = paper_tensors(x[:320]), torch.from_numpy(y[:320])
    # Plain-torch training kept to seconds: BatchNorm statistics from two train-mode passes, then the
    # classifier head fitted by SGD on the network's features, all on paper-normalised inputs.
    model.train()
    with torch.no_grad():
        for _ in range(2):
            for idx in torch.randperm(320).split(64):
                model(images[idx])
    model.eval()
    with torch.no_grad():
        model.fc, head = torch.nn.Identity(), model.fc
        features = model(images)
        model.fc = head
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        opt.step()
    args = argparse.Namespace(model="resnet18", lr=0.5, batch_size=64, epochs=300, data_path=str(folder))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 299, "args": args},
               root / "teacher.pth")
    model.eval()
    with torch.inference_mode():
        plain_pred = torch.cat([model(paper_tensors(x[i:i + 200])).argmax(1) for i in range(0, POOL, 200)]).numpy()
    return {"root": root, "pool": betons / "cifar10_train.beton", "test": betons / "cifar10_test.beton",
            "distilled": betons / "d.beton", "teacher": root / "teacher.pth", "pool_x": x, "pool_y": y,
            "test_x": test[0], "distilled_x": dx, "plain_pred": plain_pred}


def test_paper_constants_reach_every_loader(paper_files):
    """Pool, distilled and test images, through the engine's own loaders, equal
    (x / 255 - mean) / std with CIFAR's constants although the pool's own statistics are far off."""
    f = paper_files
    ws = open_workspace(inputs_of(f, teacher_model="resnet18"), 4, Machine(eval_batch_size=128))
    assert ws.norm.mean == CIFAR_MEAN and ws.norm.std == CIFAR_STD and ws.norm.source == "paper:cifar10"
    assert abs(ws.space.manifest.std[0] - CIFAR_STD[0]) > 0.05  # the pool's own std is far from CIFAR's

    def expect(x):
        return ((x.astype(np.float64) / 255 - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)).transpose(0, 3, 1, 2)

    pool = torch.cat([b[0] for b in ws.pool_loader(np.arange(POOL))]).numpy()
    assert np.abs(pool - expect(f["pool_x"])).max() < 1e-5
    test = torch.cat([b[0] for b in ws.test_loader()]).numpy()
    assert np.abs(test - expect(f["test_x"])).max() < 1e-5
    distilled = torch.cat([b[0] for b in ws.pool_loader(ws.distilled_rows)]).numpy()
    assert np.abs(distilled - expect(f["distilled_x"])).max() < 1e-5
    # The train loader with a whole-image crop: each image is the normalised image or its mirror.
    loader = ResidentTrainLoader(ws.space, ws.distilled_rows, 40, "cpu", seed=0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    images, _, index = next(iter(loader))
    want = expect(f["distilled_x"][index.numpy() - POOL])
    got = images.numpy()
    err = np.minimum(np.abs(got - want).max((1, 2, 3)), np.abs(got - want[..., ::-1]).max((1, 2, 3)))
    assert err.max() < 1e-5


def test_paper_teacher_agrees_with_plain_torch(paper_files, tmp_path, capsys):
    """ccfs-fast's teacher pass with --teacher-model resnet18 on a torchvision-style checkpoint (argparse
    args, weights_only) equals plain torch's predictions; pool statistics would change them."""
    f = paper_files
    out = tmp_path / "run"
    assert main(["run", "--pool", str(f["pool"]), "--test", str(f["test"]), "--distilled", str(f["distilled"]),
                 "--teacher", str(f["teacher"]), "--teacher-model", "resnet18", "--filter-model", "convnet_tiny",
                 "--eval-model", "convnet_tiny", "--image-per-class", "20", "--alpha", "0.2", "--curriculum-num", "1",
                 "--score", "logits", "--epochs", "1", "--num-eval", "0", "--output-dir", str(out)]) == 0
    with np.load(out / "teacher_pass.npz") as tp:
        ccfs_pred = tp["pred"]
    agree = (ccfs_pred == f["plain_pred"]).mean()
    assert agree >= 0.995, agree
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["normalize"]["source"] == "paper:cifar10" and metrics["teacher_model"] == "resnet18"

    ws = open_workspace(inputs_of(f,
                               teacher_model="resnet18", normalize="pool"), 4, Machine(eval_batch_size=200))
    _, pool_ok, _ = teacher_correct(ws, file_sha256(f["teacher"]))
    paper_correct = int((ccfs_pred == f["pool_y"]).sum())
    plain_correct = int((f["plain_pred"] == f["pool_y"]).sum())
    with capsys.disabled():  # the counts the README's fidelity section quotes
        print(f"\nteacher-correct of {POOL}: plain torch {plain_correct}, ccfs-fast paper constants {paper_correct}, "
              f"ccfs-fast pool statistics {int(pool_ok.sum())}")
    assert abs(paper_correct - plain_correct) <= 0.005 * POOL
    assert int(pool_ok.sum()) != paper_correct  # the normalisation matters to this teacher


def test_checkpoint_with_other_objects_is_refused(tmp_path):
    torch.save({"model": create_model("convnet_tiny", 10, 32).state_dict(), "args": {"a": 1},
                "extra": np.float64(1.0)}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="weights_only"):
        read_checkpoint(tmp_path / "odd.pt")


def test_auto_batch_size_per_dataset():
    assert [auto_batch_size(n, 10, "cifar10") for n in (4999, 5000, 9999, 10000)] == [32, 64, 64, 128]
    assert [auto_batch_size(n, 100, "cifar100") for n in (4999, 5000, 9999, 10000)] == [32, 64, 64, 128]
    assert [auto_batch_size(n, 200, "tiny-imagenet") for n in (100, 20_000, 200_000)] == [64, 64, 64]
    assert [auto_batch_size(n, 10, None) for n in (4999, 5000, 10000)] == [32, 64, 128]  # folder / arrays data


def test_paper_model_names():
    paper = create_model("resnet18", 10, 32)
    assert isinstance(paper.maxpool, torch.nn.Identity)
    conv = paper.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    alias = create_model("resnet18_cifar", 10, 32)
    assert alias.state_dict().keys() == paper.state_dict().keys()
    assert paper_resnet18().state_dict().keys() == paper.state_dict().keys()
    assert create_model("resnet50", 10, 32).conv1.kernel_size == (3, 3)
    plain = create_model("torchvision:resnet18", 10, 32)  # torchvision's own network, by an explicit name
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, torch.nn.MaxPool2d)
    assert create_model("mobilenet_v3_small", 10, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)  # no conv1


def test_presets_leave_classes_short_and_eval_takes_presets():
    assert all(p["shortfall"] == "short" for p in PRESETS.values())
    paper = {name: p for name, p in PRESETS.items() if name not in EXTRAPOLATED}
    assert all(p["filter_model"] == p["eval_model"] == "resnet18" for p in paper.values())  # the paper's network
    assert all(PRESETS[name]["filter_model"] == "torchvision:resnet18" for name in EXTRAPOLATED)  # ImageNet's
    assert Selection().shortfall == "fill"  # without a preset
    for_eval = preset_settings("cifar10-ipc500", EvalConfig)
    assert for_eval["epochs"] == 500 and for_eval["temperature"] == 20.0 and "image_per_class" not in for_eval
    assert "shortfall" not in for_eval and "curriculum_num" not in for_eval


def test_preset_run_prints_short_classes(engine_data, tmp_path, capsys):
    """Under a preset a class that runs out stays short, and the phase says which and by how much; the
    outputs and the last console line say how far the set is from its target. The preset is run with
    a `ccfs-fast teacher` checkpoint of another arch (convnet_small) and no --teacher-model: the
    checkpoint's record is used, the preset does not override it."""
    out = tmp_path / "short"
    args = run_args(engine_data, out, "--preset", "cifar10-ipc250", "--image-per-class", "60", "--alpha", "0.1",
                    "--curriculum-num", "1", "--epochs", "1", "--lr-warmup-epochs", "0", "--num-eval", "0")
    at = args.index("--teacher-model")
    del args[at:at + 2]
    assert main(args) == 0
    console = capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_model"] == "convnet_small" and "teacher_model" not in PRESETS["cifar10-ipc250"]
    phase = metrics["phases"][0]
    assert phase["shortfall"]["policy"] == "short" and phase["shortfall"]["unmet"] > 0
    assert sum(phase["shortfall"]["filled_per_class"]) == 0
    short = [c for c, n in enumerate(phase["candidates_per_class"]) if n < 54]
    line = next(ln for ln in (console.out + console.err).splitlines() if " short of 54 candidates" in ln)
    first = f"'class{short[0]}' {phase['candidates_per_class'][short[0]]}/54"
    assert f"phase 1: {len(short)} class" in line and first in line
    # selected_indices.json: complete (every curriculum ran), yet short of its target, per class too
    sel = json.loads((out / "selected_indices.json").read_text())
    reached = np.array(sel["real_selected_per_class"])
    assert sel["complete"] and sel["real_per_class_target"] == 54 and sel["distilled_per_class"] == 6
    assert sel["real_selected"] == len(sel["idx_selected"]) == reached.sum() < 540
    assert sel["unmet"] == phase["shortfall"]["unmet"] == 540 - reached.sum() > 0
    assert sel["unmet_per_class"] == (54 - reached).tolist() and reached.tolist() == phase["selected_per_class"]
    low, high = reached.min(), reached.max()
    last = console.out.strip().splitlines()[-1]
    assert last.startswith("final:") and f"{low}-{high} (mean {reached.mean():.1f}) of 54 real images per class" in last
    assert f"{sel['unmet']} real images unmet" in last
    assert f"{sel['unmet']} real images unmet" in (out / "exp_log.txt").read_text()


@pytest.mark.parametrize("value,needle", [
    ("banana", "pass paper (the paper's constants"),
    ("0.5,0.5", "has 2 numbers, expected 6"),
    ("pool", "was trained with paper:cifar10"),
])
def test_bad_normalize(engine_data, tmp_path, capsys, value, needle):
    out = tmp_path / "out"
    assert main(run_args(engine_data, out, "--normalize", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ccfs-fast: error:") and needle in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_normalize_paper_needs_a_known_dataset():
    from beton_builder.base.errors import ConfigError
    from ccfs_fast.data.normalization import resolve_normalization

    with pytest.raises(ConfigError, match="no constants; pass --normalize pool"):
        resolve_normalization("paper", None, (0.5,) * 3, (0.2,) * 3, "x.beton")
    tiny = resolve_normalization(None, "tiny-imagenet", (0.5,) * 3, (0.2,) * 3, "x.beton")
    assert tiny.mean == TINY_MEAN and tiny.source == "paper:tiny-imagenet"
    assert resolve_normalization(None, None, (0.5,) * 3, (0.2,) * 3, "x.beton").source == "pool"
