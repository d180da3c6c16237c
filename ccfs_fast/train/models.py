"""Model registry (name -> factory) and checkpoint loading.

Names follow the paper's code (docs/design.md §1.0): any torchvision classification model by name, e.g.
`resnet18`, is built with the paper's stem: `conv1` replaced by a 3x3 stride-1 padding-1 convolution
without bias and `maxpool` by identity, where the model has them (`resnet18_cifar` is an alias of
`resnet18`). `torchvision:NAME` is torchvision's unmodified network (its ImageNet stem). `convnet` /
`convnet_small` / `convnet_tiny`: the 3-block ConvNet of dataset distillation (conv, instance norm,
ReLU, 2x2 avg-pool; linear head), 128 / 32 / 8 channels.
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from beton_builder.base.errors import ModelError, UnknownNameError

if TYPE_CHECKING:  # torch is imported where a model is built or loaded: naming models stays light
    import torch
    from torch import nn

TORCHVISION_PREFIX = "torchvision:"


def paper_network(name: str, num_classes: int) -> nn.Module:
    """torchvision's `name` with the paper's stem (its create_model): conv1 -> 3x3 stride 1 padding 1
    without bias, maxpool -> identity, where the model has them."""
    import torchvision
    from torch import nn

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()
    return model


def resnet18_cifar(num_classes: int, side: int) -> nn.Module:
    return paper_network("resnet18", num_classes)


ModelFactory = Callable[[int, int], "nn.Module"]


def convnet(width: int) -> ModelFactory:
    def build(num_classes: int, side: int) -> nn.Module:
        from ccfs_fast.train.convnet import ConvNet

        return ConvNet(num_classes, side, width)
    return build


MODELS: dict[str, ModelFactory] = {
    "resnet18_cifar": resnet18_cifar,  # alias of `resnet18` (the paper's network)
    "convnet": convnet(128),
    "convnet_small": convnet(32),
    "convnet_tiny": convnet(8),  # input-bound benchmarks, tests
}
MODEL_NAMES_HELP = (f"{', '.join(MODELS)}, or any torchvision classification model (resnet18, resnet34, resnet50, "
                    f"wide_resnet50_2, ..., built with the paper's 3x3 stem); {TORCHVISION_PREFIX}NAME for "
                    "torchvision's unmodified network")


# Names that build the same network as another name (same state-dict keys): compared canonically.
ALIASES = {"resnet18_cifar": "resnet18"}
DEFAULT_TEACHER = "resnet18"


def canonical_model_name(name: str) -> str:
    return ALIASES.get(name, name)


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_model_name(name: str) -> str:
    """`name` if it names a model; UnknownNameError listing the valid names otherwise."""
    base = name[len(TORCHVISION_PREFIX):] if name.startswith(TORCHVISION_PREFIX) else name
    if name in MODELS or base in torchvision_names():
        return name
    raise UnknownNameError("model", name, [*MODELS, "<any torchvision classification model, e.g. resnet18>",
                                           f"{TORCHVISION_PREFIX}<name> (torchvision's unmodified network)"])


def create_model(name: str, num_classes: int, side: int) -> nn.Module:
    """A freshly initialised model (call torch.manual_seed first for reproducible weights)."""
    check_model_name(name)
    if name in MODELS:
        return MODELS[name](num_classes, side)
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision

        return torchvision.models.get_model(name[len(TORCHVISION_PREFIX):], weights=None, num_classes=num_classes)
    return paper_network(name, num_classes)


def stem_warning(name: str, side: int) -> str | None:
    """A one-line warning when `name` keeps an ImageNet stem (7x7 stride-2 conv, max-pool) on images
    of side <= 64, which it shrinks to a few pixels before the first block."""
    if name.startswith(TORCHVISION_PREFIX) and side <= 64:
        base = name[len(TORCHVISION_PREFIX):]
        return (f"warning: {name} keeps torchvision's ImageNet stem on {side}x{side} images; the paper's network "
                f"for small images is `{base}` (3x3 stride-1 conv1, no max-pool)")
    return None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's weights and the rest of what it holds (`meta`: e.g. arch, normalize,
    epoch; an argparse `args` becomes a dict)."""

    path: Path
    state: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def arch(self) -> str | None:
        arch = self.meta.get("arch")
        return arch if isinstance(arch, str) else None

    @property
    def torchvision_arch(self) -> str | None:
        """`torchvision:NAME` for a torchvision weights file (a plain state dict named `NAME-<8 hex>.pth`,
        e.g. resnet18-f37072fd.pth) whose NAME is a torchvision model; None otherwise."""
        match = re.fullmatch(r"([a-z0-9_]+)-[0-9a-f]{8,}\.pth", self.path.name)
        if self.meta or match is None or match[1] not in torchvision_names():
            return None
        return f"{TORCHVISION_PREFIX}{match[1]}"

    @property
    def normalize(self) -> dict | None:
        value = self.meta.get("normalize")
        return value if isinstance(value, dict) else None


def _state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelError(f"{path}: not a state dict (raw, {{'model': ...}} or {{'state_dict': ...}})")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _output_classes(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[int | None, int | None]:
    """(checkpoint classes, model classes) from the last 2-D weight of each (the head)."""
    heads = [name for name, p in model.state_dict().items() if p.ndim == 2]
    if not heads:
        return None, None
    head = heads[-1]
    found = state.get(head)
    return (int(found.shape[0]) if found is not None and found.ndim == 2 else None,
            int(model.state_dict()[head].shape[0]))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads a checkpoint with weights_only=True: a raw state dict, {"model": ...}, {"state_dict": ...},
    DDP `module.` prefixes, and torchvision's reference-script checkpoints, whose `args` is an
    argparse.Namespace (the one non-tensor class allowed)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            culprit = str(exc).split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in str(exc) else "a Python object"
            raise ModelError(f"checkpoint {path} holds {culprit}, which safe (weights_only) loading refuses; save "
                             "{'model': model.state_dict()} instead") from exc
        raise ModelError(f"checkpoint {path} is truncated or not a torch file ({exc})") from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ModelError(f"checkpoint {path} is truncated or not a torch file ({exc})") from exc
    meta = {}
    if isinstance(checkpoint, dict) and any(k in checkpoint for k in ("model", "state_dict")):
        meta = {k: v for k, v in checkpoint.items() if k not in ("model", "state_dict")}
        if isinstance(meta.get("args"), argparse.Namespace):
            meta["args"] = vars(meta["args"])
    return Checkpoint(path, _state_dict(checkpoint, path), meta)


def load_state(model: nn.Module, checkpoint: Checkpoint, model_name: str) -> nn.Module:
    """Loads a checkpoint's weights into `model`; class-count or architecture mismatches raise
    ModelError (naming the architecture the checkpoint records, when it records one)."""
    path, state = checkpoint.path, checkpoint.state
    found, expected = _output_classes(state, model)
    if found is not None and found != expected:
        raise ModelError(f"checkpoint {path} has {found} output classes but the pool has {expected}; use a "
                         "teacher trained on this dataset")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        missing = sorted(set(model.state_dict()) - set(state))[:3]
        unexpected = sorted(set(state) - set(model.state_dict()))[:3]
        recorded = f"; the checkpoint says it is {checkpoint.arch!r}" if checkpoint.arch else ""
        raise ModelError(f"checkpoint {path} does not fit model {model_name!r} (missing {missing}, unexpected "
                         f"{unexpected}){recorded}; pass the --teacher-model it was trained as") from exc
    return model


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Loads the weights of the checkpoint at `path` into `model` (see read_checkpoint, load_state)."""
    return load_state(model, read_checkpoint(path), model_name)


def save_checkpoint(model: nn.Module, path: str | Path, **meta: object) -> None:
    """Writes {"model": state_dict, **meta} atomically (temp file + rename)."""
    import torch

    from beton_builder.base.files import atomic_file

    state = (model.module if hasattr(model, "module") else model).state_dict()
    with atomic_file(Path(path)) as tmp:
        torch.save({"model": state, **meta}, tmp)
