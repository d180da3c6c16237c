"""Horizontal fusion (HFTA, MLSys 2021; docs/design.md §4): M models of one architecture trained as one
network, mathematically the same as M separate trainings.

Model m's channels are the m-th block of every activation: an input batch [b, M*3, S, S] holds each
model's own images side by side. One fused op per torch op: a convolution becomes a grouped
convolution (groups x M), BatchNorm / GroupNorm normalise the stacked channels (per-model statistics,
since statistics are per channel or per group), a linear layer becomes a batched matmul over the
models; parameter-free ops (ReLU, pooling, flatten, residual additions) act per channel already.
Each model keeps its own init (it is built alone, then stacked), and `FusedBank.model(m)` unstacks it.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from beton_builder.base.errors import ModelError


def _stack(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors], 0).clone()


def _param(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return None if tensor is None else nn.Parameter(tensor)


class FusedConv2d(nn.Module):
    """M Conv2d of one shape as one grouped convolution: weight [M*out, in/groups, k, k],
    groups = M * groups; input [b, M*in, H, W] -> [b, M*out, H', W']."""

    def __init__(self, convs: list[nn.Conv2d]):
        super().__init__()
        first = convs[0]
        if first.padding_mode != "zeros":
            raise ModelError(f"cannot fuse Conv2d with padding_mode={first.padding_mode!r}")
        self.models, self.out_channels = len(convs), first.out_channels
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups = first.groups * self.models
        self.weight = _param(_stack([c.weight for c in convs]))
        self.bias = _param(_stack([c.bias for c in convs]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def part(self, m: int) -> dict[str, torch.Tensor]:
        rows = slice(m * self.out_channels, (m + 1) * self.out_channels)
        out = {"weight": self.weight[rows]}
        if self.bias is not None:
            out["bias"] = self.bias[rows]
        return out


class FusedBatchNorm2d(nn.BatchNorm2d):
    """M BatchNorm2d(C) as one BatchNorm2d(M*C): statistics are per channel, so each model's
    channels see only its own batch statistics; running statistics and affine stacked."""

    def __init__(self, norms: list[nn.BatchNorm2d]):
        first = norms[0]
        super().__init__(first.num_features * len(norms), first.eps, first.momentum, first.affine,
                         first.track_running_stats, device=_device(first), dtype=_dtype(first))
        self.features = first.num_features
        with torch.no_grad():
            if first.affine:
                self.weight.copy_(_stack([n.weight for n in norms]))
                self.bias.copy_(_stack([n.bias for n in norms]))
            if first.track_running_stats:
                self.running_mean.copy_(_stack([n.running_mean for n in norms]))
                self.running_var.copy_(_stack([n.running_var for n in norms]))
                self.num_batches_tracked.copy_(first.num_batches_tracked)

    def part(self, m: int) -> dict[str, torch.Tensor]:
        rows = slice(m * self.features, (m + 1) * self.features)
        out = {}
        if self.affine:
            out.update(weight=self.weight[rows], bias=self.bias[rows])
        if self.track_running_stats:
            out.update(running_mean=self.running_mean[rows], running_var=self.running_var[rows],
                       num_batches_tracked=self.num_batches_tracked)
        return out


class FusedGroupNorm(nn.GroupNorm):
    """M GroupNorm(G, C) as one GroupNorm(M*G, M*C): groups never straddle two models' channels."""

    def __init__(self, norms: list[nn.GroupNorm]):
        first = norms[0]
        super().__init__(first.num_groups * len(norms), first.num_channels * len(norms), first.eps, first.affine,
                         device=_device(first), dtype=_dtype(first))
        self.channels = first.num_channels
        if first.affine:
            with torch.no_grad():
                self.weight.copy_(_stack([n.weight for n in norms]))
                self.bias.copy_(_stack([n.bias for n in norms]))

    def part(self, m: int) -> dict[str, torch.Tensor]:
        rows = slice(m * self.channels, (m + 1) * self.channels)
        return {"weight": self.weight[rows], "bias": self.bias[rows]} if self.affine else {}


class FusedLinear(nn.Module):
    """M Linear(in, out) as one linear head: input [b, M*in] (model-major, as flatten of a fused
    activation gives) -> [b, M*out]; weight [M, out, in], bias [M, out].

    On CUDA one baddbmm computes the M heads (one kernel instead of M matmuls, M bias adds and a
    cat); a GPU bank already sums in other orders than its models alone (grouped convolutions, TF32).
    Elsewhere each model's block is F.linear on its own slice, the very kernel it runs alone, so a CPU
    bank trains bit for bit as its models do: a batched matmul sums in another order, and small-batch
    training amplifies a 1e-16 difference to O(1) within 15 steps (measured on the float64 test).
    Both forms agree within 1e-12 in float64 on one forward and backward (tested)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.models, self.in_features, self.out_features = len(linears), linears[0].in_features, \
            linears[0].out_features
        self.weight = nn.Parameter(torch.stack([lin.weight.detach() for lin in linears]).clone())
        self.bias = _param(None if linears[0].bias is None else torch.stack([lin.bias.detach() for lin in linears]))
        self.batched: bool | None = None  # None: batched on CUDA only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.is_cuda if self.batched is None else self.batched
        return self._batched(x) if batched else self._per_model(x)

    def _per_model(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(self.in_features, dim=1)
        biases = [None] * self.models if self.bias is None else list(self.bias)
        return torch.cat([F.linear(part, w, b) for part, w, b in zip(parts, self.weight, biases)], dim=1)

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        per_model = x.reshape(batch, self.models, self.in_features).transpose(0, 1)  # [M, b, in]
        weight_t = self.weight.transpose(1, 2)  # [M, in, out]
        if self.bias is None:
            out = torch.bmm(per_model, weight_t)
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), per_model, weight_t)
        return out.transpose(0, 1).reshape(batch, self.models * self.out_features)

    def part(self, m: int) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight[m]}
        if self.bias is not None:
            out["bias"] = self.bias[m]
        return out


def _device(module: nn.Module) -> torch.device | None:
    tensors = list(module.parameters()) + list(module.buffers())
    return tensors[0].device if tensors else None


def _dtype(module: nn.Module) -> torch.dtype | None:
    params = list(module.parameters())
    return params[0].dtype if params else None


# One fused op per torch op that holds parameters or buffers.
FUSED_OPS: dict[type, Callable[[list], nn.Module]] = {
    nn.Conv2d: FusedConv2d,
    nn.BatchNorm2d: FusedBatchNorm2d,
    nn.GroupNorm: FusedGroupNorm,
    nn.Linear: FusedLinear,
}

# Parameter-free ops that act per channel (or per position), so they need no change.
PER_CHANNEL_OPS = (nn.ReLU, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Flatten)


def fuse(models: list[nn.Module]) -> nn.Module:
    """One network computing `models` side by side (see the module docstring). Raises ModelError
    when a layer has no fused op (the caller then trains the models one after another)."""
    if len({type(m) for m in models}) != 1:
        raise ModelError("only models of one architecture can be fused")
    fused = copy.deepcopy(models[0])
    parts = [dict(m.named_modules()) for m in models]
    for name, module in list(fused.named_modules()):
        if list(module.children()):
            if next(module.parameters(recurse=False), None) is not None:
                raise ModelError(f"cannot fuse {type(module).__name__} {name!r}: it holds parameters itself")
            continue
        if type(module) in FUSED_OPS:
            set_module(fused, name, FUSED_OPS[type(module)]([p[name] for p in parts]))
        elif not isinstance(module, PER_CHANNEL_OPS):
            raise ModelError(f"cannot fuse layer {name!r} ({type(module).__name__}): it has no fused op")
    return fused


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Puts `module` at the dotted path `name` of `root` (replacing what is there)."""
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class FusedBank(nn.Module):
    """M models of one architecture as one fused network. forward(images [M, b, 3, S, S], each
    model's own batch) -> logits [M, b, C].

    The bank runs the layout it names, whatever layout its models arrive in: `channels_last` puts
    every 4-D weight and the merged input in channels-last, else both in NCHW (contiguous). cuDNN picks
    NHWC kernels whenever a convolution's weight is channels-last, and `torch.cat` keeps the layout of
    the stacked weights, so models built channels-last (as CUDA runs build them) would otherwise give
    an "NCHW" bank that runs NHWC grouped convolutions (pytorch#34977: slow on some GPUs)."""

    def __init__(self, models: list[nn.Module], channels_last: bool = False):
        super().__init__()
        self.count, self.channels_last = len(models), channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = fuse(models).to(memory_format=self.memory_format)
        self._template = [copy.deepcopy(models[0]).cpu()]  # a list: not a registered submodule

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        count, batch = images.shape[:2]
        merged = images.transpose(0, 1).reshape(batch, count * images.shape[2], *images.shape[3:])
        logits = self.net(merged.contiguous(memory_format=self.memory_format))
        return logits.view(batch, count, -1).transpose(0, 1)

    def state_of(self, m: int) -> dict[str, torch.Tensor]:
        """Model m's state dict (copies), in the unfused model's keys."""
        out = {}
        for name, module in self.net.named_modules():
            if hasattr(module, "part") and isinstance(module, tuple(FUSED_OPS.values())):
                out.update({f"{name}.{k}" if name else k: v.detach().clone() for k, v in module.part(m).items()})
        return out

    def model(self, m: int) -> nn.Module:
        """Model m as a standalone module (a copy), on the bank's device."""
        standalone = copy.deepcopy(self._template[0])
        standalone.load_state_dict(self.state_of(m))
        return standalone.to(next(self.net.parameters()).device)


CHECK_SIDE = 32  # a network that pools adaptively is checked at this side (its fusion does not depend on it)


def check_fused(bank: FusedBank, models: list[nn.Module], side: int, tol: float = 1e-9) -> None:
    """Decides whether the fusion is structurally right, independent of the device's arithmetic:
    copies of the bank and of its models, on the CPU in float64 and in eval mode, compared on one
    random image per model. On a GPU, TF32 convolutions and cuDNN's choice of algorithm make a
    correct bank differ from its models by 1e-4..1e-3 (relative) in float32; in float64 a correct
    fusion agrees to ~1e-15 and a wrong one (an op that mixes models' channels) by O(1). ModelError
    when they differ by more than `tol` relative to the logits' scale. Fast: batch 1, and at
    CHECK_SIDE pixels when the network accepts it (about 0.3 s for 5 ResNet-18)."""
    bank64 = copy.deepcopy(bank).to("cpu", torch.float64).eval()
    alone = [copy.deepcopy(m).to("cpu", torch.float64).eval() for m in models]
    try:
        fused, separate = _compare_at(bank64, alone, min(side, CHECK_SIDE))
    except RuntimeError:  # a fixed-size head (e.g. the ConvNet's flatten) needs the real side
        fused, separate = _compare_at(bank64, alone, side)
    scale = separate.abs().max().clamp_min(1.0)
    if not torch.isfinite(fused).all() or (fused - separate).abs().max() > tol * scale:
        raise ModelError(f"the fused network of {type(models[0]).__name__} does not reproduce its models")


def _compare_at(bank: FusedBank, models: list[nn.Module], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(bank.count, 1, 3, side, side, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    with torch.no_grad():
        return bank(images), torch.stack([m(images[i]) for i, m in enumerate(models)])
