"""CPU kernels swapped into the engine's models (ccfs_fast.train.cpu_kernels) compute bit-identically to
torch's, and the allocator setting of the CLI (processes.reuse_freed_memory) takes effect."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ccfs_fast.train.cpu_kernels import FAST_POOL_MAX_ELEMENTS, FastAvgPool2d, fast_pool_applies, swap_cpu_kernels
from ccfs_fast.train.models import create_model


@pytest.mark.parametrize("shape,dtype", [((64, 8, 64, 64), torch.float32), ((3, 5, 16, 32), torch.float64),
                                         ((2, 3, 2, 2), torch.float32)])
def test_fast_pool_is_bit_identical_forward_and_backward(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=dtype) * 1e3).requires_grad_()
    grad = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    assert fast_pool_applies(x)
    ours, theirs = FastAvgPool2d(2), nn.AvgPool2d(2)
    out_ours, out_theirs = ours(x), theirs(x)
    assert torch.equal(out_ours, out_theirs)
    (g_ours,) = torch.autograd.grad(out_ours, x, grad)
    (g_theirs,) = torch.autograd.grad(out_theirs, x, grad)
    assert torch.equal(g_ours, g_theirs)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last),  # channels-last
    lambda: torch.randn(2, 4, 7, 8),                                                  # odd height
    lambda: torch.randn(2, 4, 8, 8).to(torch.bfloat16),                                # other dtype
    lambda: torch.randn(FAST_POOL_MAX_ELEMENTS // 64 + 1, 1, 8, 8),                    # too large
])
def test_fast_pool_falls_back_to_torch_elsewhere(make):
    x = make()
    assert not fast_pool_applies(x)
    assert torch.equal(FastAvgPool2d(2)(x), nn.AvgPool2d(2)(x))


def test_swap_keeps_the_state_dict_and_the_outputs():
    torch.manual_seed(0)
    plain = create_model("convnet_tiny", 10, 32)
    swapped = swap_cpu_kernels(create_model("convnet_tiny", 10, 32))
    swapped.load_state_dict(plain.state_dict())  # same keys, nothing added
    assert list(swapped.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, FastAvgPool2d) for m in swapped.modules()) == 3
    other = nn.Sequential(nn.AvgPool2d(3), nn.AvgPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True))
    assert not any(isinstance(m, FastAvgPool2d) for m in swap_cpu_kernels(other).modules())  # only plain 2x2
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(swapped(x), plain(x))


FAULTS = """
import resource, sys, torch
torch.set_num_threads(1)
import ctypes
if sys.argv[1] == "on":
    from beton_builder.base.processes import reuse_freed_memory
    assert reuse_freed_memory()
else:  # glibc's starting threshold, pinned: its dynamic raise depends on the order of frees (flaky)
    assert ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
from ccfs_fast.train.models import create_model
model, x = create_model("convnet_tiny", 10, 64), torch.randn(32, 3, 64, 64)
model(x).sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    model(x).sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reused_memory_cuts_page_faults_of_training_steps():
    """Five forward/backward passes of the 64x64 ConvNet in a fresh process: with freed memory
    reused, far fewer pages are faulted in than at glibc's 128 KiB mmap threshold (fresh pages are
    what made CPU steps slow). glibc raises that threshold by itself after some frees, depending on
    their order, so the comparison pins it: unpinned, the two sides were equal in some runs."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) for mode in ("off", "on")}
    assert faults["on"] * 2 < faults["off"], faults
