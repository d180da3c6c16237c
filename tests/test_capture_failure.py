"""A CUDA capture that fails, on the CPU: torch.cuda's capture pieces replaced by stand-ins that fail
the way an invalidated capture does (capture_end raising), so CudaCapture's own error path runs: the
reason recorded, the trivial capture that settles the default generator attempted, graphs off for
the rest of the process (graph_plan and GraphedStep refuse), and a step that records predictions
each step (forgetting events) never captured."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from ccfs_fast.train import graphs
from ccfs_fast.train.graphs import CaptureFailed, CudaCapture, GraphedStep, graph_plan

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def failing_cuda(monkeypatch):
    """torch.cuda's stream / graph API as stand-ins; the first graph capture fails at its end."""
    entered = []

    @contextmanager
    def graph(g, stream=None, pool=None):
        entered.append(g)
        yield
        if len(entered) == 1:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (capture invalidated)")

    @contextmanager
    def stream(s):
        yield

    class Graph:
        def register_generator_state(self, generator):
            pass

        def replay(self):
            pass

    monkeypatch.setattr(graphs, "_GRAPHS_FAILED", {})
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return entered


def _step(watch=None):
    """What graph_plan / GraphedStep read of a step before anything else."""
    cfg = SimpleNamespace(recipe=SimpleNamespace(opt="sgd"))
    return SimpleNamespace(device=CUDA0, streamed=False, watch=watch, tensor_lr=True, cfg=cfg)


def test_a_failed_capture_turns_graphs_off_for_the_process(failing_cuda):
    assert graph_plan(_step(), True, False, False).cuda_graphs  # before: graphs would be used
    with pytest.raises(CaptureFailed, match="capture invalidated"):
        CudaCapture(CUDA0).capture(lambda: torch.zeros(1), [torch.Generator()])
    assert len(failing_cuda) == 2  # the failed capture, then the trivial one that settles the default generator
    assert "capture invalidated" in graphs.graphs_failed(CUDA0)
    after = graph_plan(_step(), True, False, False)
    assert not after.cuda_graphs and after.asked and "after a failed capture" in after.note
    with pytest.raises(CaptureFailed, match="an earlier capture in this process failed"):
        GraphedStep(_step(), [8], [1])
    assert graphs.graphs_failed(torch.device("cpu")) is None


def test_a_step_that_records_predictions_is_never_captured(failing_cuda):
    plan = graph_plan(_step(watch=lambda rows, logits, labels: None), True, False, False)
    assert not plan.cuda_graphs and "forgetting events" in plan.note and not failing_cuda
