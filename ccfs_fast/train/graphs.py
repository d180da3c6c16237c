"""The capturable step captured into CUDA graphs: capture, replay, failure, and when graphs are used."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import torch

from beton_builder.base.errors import one_line
from ccfs_fast.train.step import TrainStep

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN / cuBLAS set themselves up)


class CaptureFailed(RuntimeError):
    """A CUDA graph could not be captured: the caller's stream is current again, the default generator out of
    capture mode, and graphs are off for the rest of the process (graphs_failed)."""

# CUDA graphs that failed to capture in this process, by device index: the reason. A failed capture can
# leave process-wide CUDA state behind (the default generator, the graph's private memory pool), and
# what torch leaves differs between versions, so after one failure this process trains eagerly (the
# reason recorded in every later training's execution record) instead of rebuilding that state by hand.
# The CUDA context is per process; so is this record.
_GRAPHS_FAILED: dict[int, str] = {}


def graphs_failed(device: torch.device) -> str | None:
    """Why CUDA graphs are off for the rest of this process on `device` (a capture failed), or None."""
    return _GRAPHS_FAILED.get(_device_index(device)) if device.type == "cuda" else None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CudaCapture:
    """How GraphedStep captures on CUDA: torch's public `torch.cuda.graph(graph, pool=, stream=)` on a
    side stream, inside `torch.cuda.stream`, whose exit restores the caller's stream whatever happens
    (torch.cuda.graph's own exit skips that when capture_end raises). A capture that fails is given up:
    the default CUDA generator is put back out of capture mode by one trivial capture that succeeds (an
    invalidated capture raises in capture_end before the generators' capture epilogue, so a later eager
    draw from it would raise "Offset increment outside graph capture"), and graphs are off for the rest
    of the process (graphs_failed). The failed graph's pool stays allocated (at most one capture's
    memory, once per process); the students' generators are replaced by GraphedStep."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def warm_up(self, fn: Callable[[], object], times: int) -> None:
        """fn() `times` times on a side stream (cuDNN / cuBLAS set themselves up off the capture)."""
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for _ in range(times):
                fn()
        main.wait_stream(self.stream)

    def capture(self, fn: Callable[[], torch.Tensor], generators: list[torch.Generator]
                ) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, fn's output tensor) of fn captured into a new graph; CaptureFailed after giving up."""
        graph = torch.cuda.CUDAGraph()
        for g in generators:
            graph.register_generator_state(g)
        try:
            # each graph its own private pool (the default): graphs of one step may replay in any order
            with torch.cuda.stream(self.stream), torch.cuda.graph(graph, stream=self.stream):
                out = fn()
        except Exception as exc:  # a Python error mid-capture, or capture_end refusing an invalidated capture
            reason = one_line(exc)
            _GRAPHS_FAILED[_device_index(self.device)] = reason
            self.settle_default_generator()
            raise CaptureFailed(reason) from exc
        return graph.replay, out

    def settle_default_generator(self) -> None:
        """One trivial capture that succeeds: its capture_begin / capture_end run the default CUDA
        generator's capture prologue and epilogue, which leaves it out of capture mode."""
        with suppress(Exception):  # if even this fails, graphs are already off for the process
            trivial = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream), torch.cuda.graph(trivial, stream=stream):
                torch.zeros(1, device=self.device).add_(1)
            torch.cuda.synchronize(self.device)
            del trivial


class GraphedStep:
    """The step captured into one CUDA graph per batch shape and replayed: __call__(rows) copies the
    rows into the shape's static buffer and replays its graph. `capture`: how graphs are captured
    (CudaCapture on the step's device; the tests give one that fails). A capture that fails raises
    CaptureFailed and leaves the step as it was before (parameters, buffers, momentum, fresh
    generators at their seeds), so it then trains exactly as an eager-only step."""

    def __init__(self, step: TrainStep, batch_sizes: list[int], seeds: list[int], capture: CudaCapture | None = None):
        self.step = step
        self.rows: dict[int, torch.Tensor] = {}
        self.replays: dict[int, Callable[[], None]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        failed = graphs_failed(step.device)
        if failed is not None and capture is None:
            raise CaptureFailed(f"an earlier capture in this process failed ({failed})")
        try:
            capture = capture or CudaCapture(step.device)
        except (RuntimeError, ValueError, AssertionError) as exc:  # no CUDA stream on this device
            raise CaptureFailed(one_line(exc)) from exc
        count = len(step.generators)
        saved = step.snapshot()
        ok = False
        try:
            for batch in sorted(set(batch_sizes), reverse=True):
                rows = torch.zeros((count, batch), dtype=torch.int64, device=step.device)
                capture.warm_up(lambda rows=rows: step(rows), WARMUP_STEPS)
                step.optimizer.zero_grad(set_to_none=True)
                self.replays[batch], self.losses[batch] = capture.capture(lambda rows=rows: step(rows),
                                                                          step.generators)
                self.rows[batch] = rows
            ok = True
        finally:
            step.restore(saved, seeds, renew_generators=not ok)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        batch = rows.shape[1]
        self.rows[batch].copy_(rows)
        self.replays[batch]()
        return self.losses[batch]


@dataclass
class StepRun:
    """How a training ran: cuda_graphs (bool); `note`, why not when they were not used; `asked`,
    whether they were asked for (a CUDA run with --cuda-graphs): only then is the note a fallback,
    printed on stderr."""

    cuda_graphs: bool
    note: str | None = None
    asked: bool = False
    train_data: str | None = None  # how the train set was read: resident or streamed, and why (Workspace.train_form)
    capture_s: float = 0.0  # capturing the graphs, their warm-up steps included (0 when eager)

    def record(self) -> dict:
        """What metrics.json and state.json keep of it."""
        return {"cuda_graphs": self.cuda_graphs, "cuda_graphs_off": self.note, "fallback": self.asked
                and not self.cuda_graphs, "train_data": self.train_data, "capture_s": self.capture_s}


def graph_plan(step: TrainStep, want: bool, distributed: bool, compiled: bool) -> StepRun:
    """Whether to capture CUDA graphs and, when not, the one-line reason (a fallback when asked for)."""
    if step.device.type != "cuda":
        return StepRun(False, f"cuda graphs: CUDA only (device {step.device.type}); running eagerly")
    if step.streamed:
        return StepRun(False, "cuda graphs: off while the train set streams through FFCV's decoders; running eagerly")
    if not want:
        return StepRun(False, "cuda graphs: off (--no-cuda-graphs); running eagerly")
    if step.watch is not None:  # a Python callback would run at capture only, never on replay
        return StepRun(False, "cuda graphs: off while each step's predictions are recorded (forgetting events); "
                              "running eagerly", True)
    if distributed:
        return StepRun(False, "cuda graphs: off under torchrun (gradients are all-reduced by DDP); running eagerly",
                       True)
    if compiled:
        return StepRun(False, "cuda graphs: off with --compile; running eagerly", True)
    failed = graphs_failed(step.device)
    if failed is not None:
        return StepRun(False, f"cuda graphs: off for the rest of this process after a failed capture ({failed}); "
                              "running eagerly", True)
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):  # each student's generator in the graph
        return StepRun(False, f"cuda graphs: torch {torch.__version__} cannot register generators with a graph "
                              "(torch >= 2.5 can); running eagerly", True)
    if not step.tensor_lr:
        return StepRun(False, f"cuda graphs: need fused SGD (--opt sgd / sgd_nesterov with --fused-optimizer), "
                              f"got --opt {step.cfg.recipe.opt}; running eagerly", True)
    return StepRun(True, asked=True)
