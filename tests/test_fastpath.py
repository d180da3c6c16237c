"""The GPU fast-path switches change nothing on the CPU beyond their definition."""
from __future__ import annotations

import json

import pytest
import torch

from ccfs_fast.train.losses import compute_autocast
from ccfs_fast.train.models import create_model
from ccfs_fast.train.optim import make_optimizer
from ccfs_fast.train.recipe import FastPath, TrainRecipe


@pytest.mark.parametrize("name", ["resnet18_cifar", "convnet"])
def test_channels_last_same_logits(name):
    torch.manual_seed(0)
    model = create_model(name, 10, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        plain = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_close_to_float():
    torch.manual_seed(0)
    model = create_model("convnet", 10, 32).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        plain = model(x)
        with compute_autocast(x.device.type, bf16=True):
            half = model(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), plain, rtol=0.05, atol=0.05)
    assert (half.float().argmax(1) == plain.argmax(1)).float().mean() >= 0.75


def test_fused_optimizer_same_steps_as_foreach():
    torch.manual_seed(0)
    a = torch.nn.Linear(6, 3)
    b = torch.nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    recipe = TrainRecipe(lr=0.1, momentum=0.9, weight_decay=1e-4)
    try:
        opt_a, opt_b = make_optimizer(a, recipe, fused=True), make_optimizer(b, recipe, fused=False)
    except RuntimeError as exc:  # fused kernels unavailable for this device in this torch build
        pytest.skip(str(exc))
    x = torch.randn(16, 6)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6)


def test_fast_path_defaults_resolve_per_device():
    # CPU: train in NCHW, predict in channels-last; --no-channels-last turns both off
    assert FastPath().resolve("cpu") == FastPath(False, False, False, False, False, False, infer_channels_last=True)
    assert not FastPath(channels_last=False).resolve("cpu").infer_channels_last
    assert FastPath().resolve("cuda").infer_channels_last
    cuda = FastPath().resolve("cuda")
    assert cuda.channels_last and cuda.fused_optimizer and cuda.cudnn_benchmark and cuda.cuda_graphs
    assert not cuda.bf16  # fp32 unless asked: what the paper's code computes
    assert not FastPath(cuda_graphs=True).resolve("cpu").cuda_graphs  # graphs need CUDA
    assert FastPath(channels_last=True).resolve("cpu").channels_last


def test_run_records_the_fast_path(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["fast_path"] == {"channels_last": False, "bf16": False, "cudnn_benchmark": False,
                                    "fused_optimizer": False, "compile": False, "cuda_graphs": False,
                                    "infer_channels_last": True}
    assert metrics["world_size"] == 1
