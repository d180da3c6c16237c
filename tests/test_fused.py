"""The fused model bank (ccfs_fast.train.bank): each fused op equals its torch op applied per model, and a
bank of 3 models trained together equals 3 separate trainings (float64, CPU)."""
from __future__ import annotations

import pytest
import torch
from conftest import inputs_of
from torch import nn

from beton_builder.base.errors import ModelError
from ccfs_fast.data.loaders import epoch_order
from ccfs_fast.runs.config import Machine
from ccfs_fast.train.bank import (
    FusedBank,
    FusedBatchNorm2d,
    FusedConv2d,
    FusedGroupNorm,
    FusedLinear,
    check_fused,
    fuse,
)
from ccfs_fast.train.models import create_model
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.step import Single, StepConfig, TrainStep

M = 3
F64 = torch.float64


def _per_model(x: torch.Tensor, m: int, width: int) -> torch.Tensor:
    return x[:, m * width:(m + 1) * width]


def _check_op(fused: nn.Module, alone: list[nn.Module], x: torch.Tensor, in_width: int) -> None:
    """Forward and input / parameter gradients of the fused op equal each model's op on its slice."""
    x = x.clone().requires_grad_(True)
    xs = [_per_model(x, m, in_width).detach().clone().requires_grad_(True) for m in range(M)]
    out = fused(x)
    outs = [op(xm) for op, xm in zip(alone, xs)]
    torch.testing.assert_close(out, torch.cat(outs, 1), rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    width = outs[0].shape[1]
    for m, (o, xm) in enumerate(zip(outs, xs)):
        o.backward(_per_model(grad, m, width))
        torch.testing.assert_close(_per_model(x.grad, m, in_width), xm.grad, rtol=0, atol=1e-12)
    for m, op in enumerate(alone):
        for name, part in fused.part(m).items():
            if name == "num_batches_tracked":
                continue
            ref = getattr(op, name)
            torch.testing.assert_close(part, ref.detach(), rtol=0, atol=1e-12)
            if isinstance(ref, nn.Parameter):
                fused_grad = getattr(fused, name).grad
                rows = fused_grad[m] if isinstance(fused, FusedLinear) else \
                    fused_grad[m * ref.shape[0]:(m + 1) * ref.shape[0]]
                torch.testing.assert_close(rows, ref.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups,bias,stride", [(1, False, 1), (1, True, 2), (2, True, 1)])
def test_fused_conv2d(groups, bias, stride):
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, 3, stride, 1, groups=groups, bias=bias).double() for _ in range(M)]
    _check_op(FusedConv2d(convs), convs, torch.randn(5, M * 4, 9, 9, dtype=F64), 4)


def test_fused_batchnorm2d_train_and_eval():
    torch.manual_seed(0)
    norms = [nn.BatchNorm2d(4).double() for _ in range(M)]
    for n in norms:  # distinct affine parameters and running statistics per model
        n.weight.data.uniform_(0.5, 1.5)
        n.bias.data.normal_()
        n.running_mean.normal_()
        n.running_var.uniform_(0.5, 2)
    fused = FusedBatchNorm2d(norms)
    _check_op(fused, norms, torch.randn(6, M * 4, 5, 5, dtype=F64), 4)  # train mode: running stats move too
    for m, n in enumerate(norms):
        torch.testing.assert_close(fused.part(m)["running_var"], n.running_var, rtol=0, atol=1e-12)
    fused.eval()
    for n in norms:
        n.eval()
    _check_op(fused, norms, torch.randn(2, M * 4, 5, 5, dtype=F64), 4)


def test_fused_groupnorm():
    torch.manual_seed(0)
    norms = [nn.GroupNorm(2, 6).double() for _ in range(M)]
    for n in norms:
        n.weight.data.uniform_(0.5, 1.5)
        n.bias.data.normal_()
    _check_op(FusedGroupNorm(norms), norms, torch.randn(4, M * 6, 5, 5, dtype=F64), 6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [False, True])  # per model (CPU) and one baddbmm (CUDA's form)
def test_fused_linear(bias, batched):
    torch.manual_seed(0)
    linears = [nn.Linear(7, 5, bias=bias).double() for _ in range(M)]
    head = FusedLinear(linears)
    head.batched = batched
    _check_op(head, linears, torch.randn(4, M * 7, dtype=F64), 7)


def test_unfusable_layers_are_refused():
    with pytest.raises(ModelError, match="LayerNorm"):
        fuse([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)])
    with pytest.raises(ModelError, match="Dropout"):
        fuse([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)) for _ in range(2)])


@pytest.mark.parametrize("name", ["resnet18", "convnet_small", "torchvision:resnet18"])
def test_bank_forward_and_unstack(name):
    models = []
    for seed in range(M):
        torch.manual_seed(seed)
        models.append(create_model(name, 10, 32))
    bank = FusedBank(models)
    check_fused(bank, models, 32)
    for m, model in enumerate(models):
        unstacked = bank.model(m)
        for key, value in model.state_dict().items():
            assert torch.equal(unstacked.state_dict()[key], value), key


def test_bank_runs_the_layout_it_names_whatever_its_models_arrive_in():
    """CUDA runs build models channels-last: a `bank_nchw` must still hold NCHW weights and feed NCHW
    input (cuDNN runs NHWC kernels whenever the weight is channels-last), and `bank_channels_last` the
    reverse, for models arriving in either layout; both compute what the models compute."""
    from ccfs_fast.train.students import BANK_LAYOUTS

    images = torch.randn(M, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for arrive in (torch.channels_last, torch.contiguous_format):
        models = []
        for seed in range(M):
            torch.manual_seed(seed)
            models.append(create_model("resnet18_cifar", 10, 32).to(memory_format=arrive).eval())
        expected = torch.stack([m(images[i]) for i, m in enumerate(models)])
        for layout, wanted in (("bank_nchw", torch.contiguous_format), ("bank_channels_last", torch.channels_last)):
            bank = BANK_LAYOUTS[layout](models, 32, arrive == torch.channels_last)
            convs = [w for w in bank.parameters() if w.dim() == 4]
            assert len(convs) == 20
            wrong = [w.shape for w in convs if not w.is_contiguous(memory_format=wanted)]
            assert not wrong, f"{layout} from {arrive}: {len(wrong)} of 20 conv weights in the other layout"
            seen: list[torch.Tensor] = []
            hook = bank.net.conv1.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0]))
            torch.testing.assert_close(bank.eval()(images), expected, rtol=1e-4, atol=1e-4)
            hook.remove()
            assert seen[0].is_contiguous(memory_format=wanted), layout


class _Tf32Noise(nn.Module):
    """Wraps a network; float32 outputs get relative noise of 7e-4, the size TF32 convolutions give
    a correct ResNet-18 bank on a GPU (float64 computes exactly, as on any device)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.dtype == torch.float32:
            out = out * (1 + 7e-4 * torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
        return out


def test_check_fused_survives_tf32_noise_and_rejects_a_wrong_fusion():
    models = []
    for seed in range(M):
        torch.manual_seed(seed)
        models.append(create_model("resnet18", 10, 32))
    bank = FusedBank(models)
    bank.net = _Tf32Noise(bank.net)
    images = torch.randn(M, 2, 3, 32, 32)
    with torch.no_grad():  # in float32 the bank now differs from its models by TF32-sized amounts
        gap = (bank.eval()(images) - torch.stack([m.eval()(images[i]) for i, m in enumerate(models)])).abs().max()
    assert gap > 1e-4 * 1.0
    check_fused(bank, models, 32)  # structurally right: accepted
    with torch.no_grad():  # a head that hands model 0 the weights of model 1: structurally wrong
        bank.net.net.fc.weight[0] = models[1].fc.weight
    with pytest.raises(ModelError, match="does not reproduce its models"):
        check_fused(bank, models, 32)


def _bank_and_separate(name: str, side: int, steps_per_epoch: int, epochs: int, batch: int, together=FusedBank):
    """Trains a bank of M models and M single models with the same seeds through TrainStep (float64,
    foreach SGD); returns both sides' per-step losses, models and momentum buffers."""
    n = steps_per_epoch * batch - 2  # a last partial batch
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    inv, shift = torch.full((1, 3, 1, 1), 1 / (255 * 0.25)), torch.full((1, 3, 1, 1), -2.0)
    torch.manual_seed(100)
    teacher = create_model("convnet_tiny", 10, side).double().eval()
    cfg = StepConfig(TrainRecipe(lr=0.05, momentum=0.9, weight_decay=5e-4), 4.0, fused_optimizer=False, dtype=F64)
    seeds = [11, 12, 13]

    def fresh(seed):
        torch.manual_seed(seed)
        return create_model(name, 10, side).double()

    bank = together([fresh(s) for s in seeds])
    bank_step = TrainStep(bank, bank, teacher, images, [torch.Generator().manual_seed(s) for s in seeds], inv, shift,
                          cfg)
    singles = [fresh(s) for s in seeds]
    single_steps = [TrainStep(Single(m), Single(m), teacher, images, [torch.Generator().manual_seed(s)], inv, shift,
                              cfg) for m, s in zip(singles, seeds)]
    bank.train()
    for m in singles:
        m.train()
    bank_losses, single_losses = [], []
    for _ in range(epochs):
        orders = torch.stack([epoch_order(n, g) for g in bank_step.generators])
        single_orders = [epoch_order(n, s.generators[0]) for s in single_steps]
        for begin in range(0, n, batch):
            bank_losses.append(bank_step(orders[:, begin:begin + batch]))
            single_losses.append(torch.cat([s(o[None, begin:begin + batch])
                                            for s, o in zip(single_steps, single_orders)]))
    return bank, bank_step, singles, single_steps, torch.stack(bank_losses), torch.stack(single_losses)


@pytest.mark.parametrize("name,side", [("resnet18", 8), ("convnet_small", 16)])
def test_bank_trains_like_separate_models(name, side):
    """K = 20 steps (2 epochs of 10, the last batch of each partial): parameters, BatchNorm running
    statistics, momentum buffers and per-step losses of every model agree within 1e-9 (relative for
    the state, whose running variances grow large)."""
    bank, bank_step, singles, single_steps, bank_losses, single_losses = _bank_and_separate(name, side, 10, 2, 4)
    assert bank_losses.shape == (20, M)
    torch.testing.assert_close(bank_losses, single_losses, rtol=0, atol=1e-9)
    for m, single in enumerate(singles):
        state, ref = bank.state_of(m), single.state_dict()
        assert state.keys() == ref.keys()
        for key in ref:
            # relative too: float64 grouped and plain convolutions sum in different orders (CPU-dependent),
            # and BatchNorm running variances of this small-batch training reach 1e5
            torch.testing.assert_close(state[key].double(), ref[key].double(), rtol=1e-9, atol=1e-9, msg=key)
    for m, (single, step) in enumerate(zip(singles, single_steps)):
        buffers = _momentum_of(bank, bank_step, m)
        for key, p in single.named_parameters():
            torch.testing.assert_close(buffers[key], step.optimizer.state[p]["momentum_buffer"], rtol=0, atol=1e-9,
                                       msg=key)


def _momentum_of(bank: FusedBank, step: TrainStep, m: int) -> dict[str, torch.Tensor]:
    """Model m's momentum buffers, sliced out of the fused ones as its parameters are (part(m))."""
    out = {}
    for name, module in bank.net.named_modules():
        if not hasattr(module, "part"):
            continue
        params = dict(module.named_parameters(recurse=False))
        saved = {k: p.data for k, p in params.items()}
        for p in params.values():
            p.data = step.optimizer.state[p]["momentum_buffer"]
        out.update({f"{name}.{k}": v.clone() for k, v in module.part(m).items() if k in params})
        for k, p in params.items():
            p.data = saved[k]
    return out


def test_streams_layout_trains_exactly_like_separate_models():
    """The `streams` layout (M unfused models, each forward on its own CUDA stream; one after another
    on the CPU) under one KD step: the same per-step losses and parameters as M separate trainings."""
    from ccfs_fast.train.step import Separate

    together, _, singles, _, losses, single_losses = _bank_and_separate("convnet_small", 16, 10, 2, 4, Separate)
    assert together.streams is None and losses.shape == (20, M)
    torch.testing.assert_close(losses, single_losses, rtol=0, atol=1e-12)
    for m, single in enumerate(singles):
        for (key, a), b in zip(together.model(m).state_dict().items(), single.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=key)


def test_layout_probe_times_every_layout(engine_data):
    """The final evaluation's layout probe (CUDA runs it; here called directly on the CPU): every
    layout is built, stepped and timed; without CUDA the engine picks the default layout unprobed."""
    from ccfs_fast.runs.workspace import open_workspace
    from ccfs_fast.train.recipe import FastPath
    from ccfs_fast.train.students import BANK_LAYOUTS, default_layout, pick_layout, probe_layouts

    ws = open_workspace(inputs_of(engine_data), 4, Machine(eval_batch_size=64),
                        fast=FastPath().resolve("cpu"))
    resident = ws.resident(ws.distilled_rows)
    recipe = TrainRecipe(epochs=1, lr_warmup_epochs=0)
    figures = probe_layouts(ws, resident, "convnet_small", recipe, 4.0, [1, 2, 3], 8, steps=2)
    assert set(figures) == set(BANK_LAYOUTS)
    assert all(f["step_ms"] > 0 and f["cuda_graphs"] is False for f in figures.values()), figures
    assert pick_layout(ws, resident, "convnet_small", recipe, 4.0, [1, 2, 3], 8) == (default_layout(ws), None)
