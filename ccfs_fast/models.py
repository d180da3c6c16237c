"""Model registry (name -> factory) and checkpoint loading.

`resnet18_cifar`: torchvision resnet18 with a 3x3 stride-1 first conv and no max-pool (the paper's
network for 32x32 and 64x64); `convnet` / `convnet_small` / `convnet_tiny`: the 3-block ConvNet of
dataset distillation (conv, instance norm, ReLU, 2x2 avg-pool; linear head), 128 / 32 / 8 channels;
any other name is looked up among torchvision's classification models.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ModelError, UnknownNameError


def resnet18_cifar(num_classes: int, side: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class ConvNet(nn.Module):
    """depth x [conv 3x3 (width), instance norm (GroupNorm with one group per channel), ReLU,
    2x2 avg-pool], then a linear head on the flattened (side / 2^depth)^2 * width features."""

    def __init__(self, num_classes: int, side: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(width, width, affine=True),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        feat_side = side // (2 ** depth)
        if feat_side < 1:
            raise ModelError(f"images of side {side} are too small for a depth-{depth} ConvNet")
        self.classifier = nn.Linear(width * feat_side * feat_side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


ModelFactory = Callable[[int, int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "resnet18_cifar": resnet18_cifar,
    "convnet": lambda num_classes, side: ConvNet(num_classes, side, 128),
    "convnet_small": lambda num_classes, side: ConvNet(num_classes, side, 32),
    "convnet_tiny": lambda num_classes, side: ConvNet(num_classes, side, 8),  # input-bound benchmarks, tests
}


def create_model(name: str, num_classes: int, side: int) -> nn.Module:
    """A freshly initialised model (call torch.manual_seed first for reproducible weights)."""
    if name in MODELS:
        return MODELS[name](num_classes, side)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise UnknownNameError("model", name, [*MODELS, "<any torchvision classification model>"])


def _state_dict(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
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


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str) -> nn.Module:
    """Loads weights into `model`; accepts a raw state dict, {"model": ...}, {"state_dict": ...}
    and DDP `module.` prefixes. Class-count or architecture mismatches raise ModelError."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"checkpoint {path} is truncated or not a torch file ({exc})") from exc
    state = _state_dict(checkpoint, path)
    found, expected = _output_classes(state, model)
    if found is not None and found != expected:
        raise ModelError(f"checkpoint {path} has {found} output classes but the pool has {expected}; use a "
                         "teacher trained on this dataset")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        missing = sorted(set(model.state_dict()) - set(state))[:3]
        unexpected = sorted(set(state) - set(model.state_dict()))[:3]
        raise ModelError(f"checkpoint {path} does not fit model {model_name!r} (missing {missing}, unexpected "
                         f"{unexpected}); pass the --teacher-model it was trained as") from exc
    return model


def save_checkpoint(model: nn.Module, path: str | Path, **meta: object) -> None:
    """Writes {"model": state_dict, **meta} atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = (model.module if hasattr(model, "module") else model).state_dict()
    torch.save({"model": state, **meta}, tmp)
    tmp.replace(path)
