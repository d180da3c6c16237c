"""The capturable train step (ccfs_fast.train.step) on the CPU: it trains exactly as a plain PyTorch KD
loop over ResidentTrainLoader (tests/reference_training.py), sees every sample once per epoch, never
waits for the host inside a step, draws reproducible random numbers per model, and falls back to eager
when capture fails."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from reference_training import reference_train_kd
from torch.utils._python_dispatch import TorchDispatchMode

from beton_builder.beton import BetonFile
from beton_builder.table import ImageTable
from beton_builder.writer import write_beton
from ccfs_fast.cli import main
from ccfs_fast.data.loaders import ResidentTrainLoader, epoch_order, norm_tensors
from ccfs_fast.data.space import IndexSpace
from ccfs_fast.train.bank import FusedBank
from ccfs_fast.train.graphs import CaptureFailed, GraphedStep, StepRun, graph_plan
from ccfs_fast.train.loop import train_students
from ccfs_fast.train.losses import kd_losses
from ccfs_fast.train.models import create_model
from ccfs_fast.train.recipe import TrainRecipe
from ccfs_fast.train.step import Single, StepConfig, TrainStep

F64 = torch.float64
N, BATCH = 45, 8  # 6 steps an epoch, the last one of 5 images
RECIPE = TrainRecipe(epochs=2, lr=0.05, momentum=0.9, weight_decay=5e-4, lr_warmup_epochs=1)


@pytest.fixture(scope="module")
def small_space(tmp_path_factory):
    """An 8x8 arrays .beton of 45 images (small enough for resnet18 in float64)."""
    root = tmp_path_factory.mktemp("step")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, N)
    write_beton(ImageTable(images, labels, tuple(str(c) for c in range(10)), "arrays", "test"), root / "s.beton")
    return IndexSpace(BetonFile.open(root / "s.beton"))


def _models(seed: int):
    torch.manual_seed(seed)
    student = create_model("resnet18", 10, 8).double()
    torch.manual_seed(100)
    teacher = create_model("convnet_tiny", 10, 8).double().eval()
    return student, teacher


class RecordingStep(TrainStep):
    """A TrainStep that remembers the rows of every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def __call__(self, rows):
        self.seen.append(rows.clone())
        return super().__call__(rows)


def _step_training(space, fused_optimizer: bool) -> tuple[torch.nn.Module, RecordingStep]:
    student, teacher = _models(3)
    loader = ResidentTrainLoader(space, np.arange(N), BATCH, "cpu", seed=3, dtype=F64)
    inv, shift = norm_tensors(space.norm, torch.device("cpu"))
    cfg = StepConfig(RECIPE, 4.0, fused_optimizer=fused_optimizer, dtype=F64)
    step = RecordingStep(Single(student), Single(student), teacher, loader.images, [torch.Generator().manual_seed(3)],
                         inv, shift, cfg)
    train_students(step, [3], BATCH, RECIPE)
    return student, step


def _plain_training(space) -> torch.nn.Module:
    student, teacher = _models(3)
    loader = ResidentTrainLoader(space, np.arange(N), BATCH, "cpu", seed=3, dtype=F64)
    reference_train_kd(student, teacher, loader, RECIPE, 4.0)
    return student


def test_step_equals_the_plain_loop(small_space):
    """2 epochs with a last partial batch: the eager step (foreach SGD) and the plain loop give the same
    parameters and BatchNorm statistics, bit for bit; every sample is seen once per epoch."""
    plain = _plain_training(small_space)
    stepped, step = _step_training(small_space, fused_optimizer=False)
    for key, value in plain.state_dict().items():
        assert torch.equal(stepped.state_dict()[key], value), key
    assert [r.shape[1] for r in step.seen] == [8, 8, 8, 8, 8, 5] * 2
    for epoch in range(2):
        rows = torch.cat([r[0] for r in step.seen[epoch * 6:(epoch + 1) * 6]])
        assert sorted(rows.tolist()) == list(range(N))
    assert not torch.equal(step.seen[0], step.seen[6])  # reshuffled each epoch


def test_fused_sgd_with_a_device_lr_tensor_matches(small_space):
    """The CUDA-graph path's optimiser (fused SGD, learning rate a tensor filled once per epoch)."""
    plain = _plain_training(small_space)
    stepped, step = _step_training(small_space, fused_optimizer=True)
    assert isinstance(step.optimizer.param_groups[0]["lr"], torch.Tensor)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(stepped.state_dict()[key], value, rtol=0, atol=1e-10, msg=key)


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "allclose", "masked_select",
            "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "bincount",
            "histc", "_assert_async", "_assert_scalar", "nonzero_static"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bank", [False, True])
def test_a_step_never_waits_for_the_host(small_space, bank):
    student, teacher = _models(3)
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    students = FusedBank([student, _models(4)[0]]) if bank else Single(student)
    gens = [torch.Generator().manual_seed(s) for s in range(students.count)]
    step = TrainStep(students, students, teacher, images, gens, inv, shift, StepConfig(RECIPE, 4.0, dtype=F64))
    rows = torch.stack([epoch_order(N, g)[:BATCH] for g in gens])
    step(rows)  # the first step creates nothing new on later ones; check a later one
    with OpLog() as log:
        step(rows)
    assert "convolution" in log.ops and "_fused_sgd_" in log.ops and "grid_sampler_2d" in log.ops
    assert not SYNC_OPS & set(log.ops), sorted(SYNC_OPS & set(log.ops))


def test_seeds_reproduce_each_models_random_numbers(small_space):
    _, teacher = _models(3)
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    cfg = StepConfig(RECIPE, 4.0)

    def augmented(seeds, count=1):
        models = [create_model("convnet_tiny", 10, 8) for _ in seeds]
        students = FusedBank(models) if len(seeds) > 1 else Single(models[0])
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        step = TrainStep(students, students, teacher.float(), images, gens, inv, shift, cfg)
        orders = torch.stack([epoch_order(N, g) for g in gens])
        return orders, torch.stack([step.augment(orders[:, :BATCH]) for _ in range(count)])

    order_a, a = augmented([7, 8], 2)
    order_b, b = augmented([7, 8], 2)
    assert torch.equal(order_a, order_b) and torch.equal(a, b)           # a seed gives the same numbers
    order_c, c = augmented([7], 2)
    assert torch.equal(order_c[0], order_a[0]) and torch.equal(c[:, 0], a[:, 0])  # model 0 as if alone
    assert not torch.equal(order_a[0], order_a[1]) and not torch.equal(a[:, 0], a[:, 1])  # models differ
    assert not torch.equal(a[0], a[1])                                    # each step draws anew


def test_graph_plan_and_capture_fallback(small_space, capsys):
    student, teacher = _models(3)
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    step = TrainStep(Single(student), Single(student), teacher, images, [torch.Generator().manual_seed(3)], inv, shift,
                  StepConfig(TrainRecipe(epochs=1, lr_warmup_epochs=0), 4.0, dtype=F64))
    on_cpu = graph_plan(step, True, False, False)  # the CPU runs the step eagerly: no fallback, a reason kept
    assert not on_cpu.cuda_graphs and not on_cpu.asked and on_cpu.note.startswith("cuda graphs: CUDA only")
    assert on_cpu.record() == {"cuda_graphs": False, "cuda_graphs_off": on_cpu.note, "fallback": False,
                               "train_data": None, "capture_s": 0.0}  # set by the training that runs the step
    before = [p.clone() for p in student.parameters()]
    results, plan = train_students(step, [3], BATCH, TrainRecipe(epochs=1, lr_warmup_epochs=0),
                                   plan=StepRun(True, asked=True))  # asked to capture where no graph can exist
    assert not plan.cuda_graphs and plan.note.startswith("cuda graphs: capture failed (")
    assert plan.record()["fallback"]
    console = capsys.readouterr()
    assert plan.note in console.err.splitlines() and results[0].images == N  # one line, on stderr
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained eagerly


class FailingCapture:
    """Captures as the CPU can: the step runs for real (parameters, momentum, BatchNorm statistics and
    generators all move, which a CUDA capture does not even do), and the `fail_on`-th capture fails as
    an invalidated CUDA capture does; earlier ones 'succeed' and replay by running the step."""

    def __init__(self, fail_on: int):
        self.fail_on, self.captures = fail_on, 0

    def warm_up(self, fn, times):
        for _ in range(times):
            fn()

    def capture(self, fn, generators):
        self.captures += 1
        out = fn()
        if self.captures == self.fail_on:
            raise CaptureFailed("operation not permitted when stream is capturing (made to fail)")
        return fn, out


@pytest.mark.parametrize("fail_on", [1, 2])  # the full batch's capture, or the partial batch's after it
@pytest.mark.parametrize("bank", [False, True])
def test_a_failed_capture_trains_exactly_like_an_eager_only_run(small_space, fail_on, bank, capsys):
    """A capture that fails after warm-up steps (and, fail_on=2, after another shape was captured) falls
    back to the eager step, which trains bit for bit as a run that never tried: parameters, BatchNorm
    statistics, per-epoch losses; the generators are new objects (never registered with a graph)."""
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3, dtype=F64).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    seeds = [3, 4] if bank else [3]

    def training(plan, make_graphed=GraphedStep):
        models = [_models(s)[0] for s in seeds]
        students = FusedBank(models) if bank else Single(models[0])
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        step = TrainStep(students, students, _models(0)[1], images, gens, inv, shift,
                      StepConfig(RECIPE, 4.0, fused_optimizer=False, dtype=F64))
        results, ran = train_students(step, seeds, BATCH, RECIPE, plan=plan, make_graphed=make_graphed)
        return students, step, gens, results, ran

    eager, _, _, eager_results, _ = training(StepRun(False))
    failing = FailingCapture(fail_on)
    fell_back, step, gens, results, ran = training(
        StepRun(True, asked=True), lambda step, shapes, seeds: GraphedStep(step, shapes, seeds, failing))
    assert failing.captures == fail_on and not ran.cuda_graphs and ran.record()["fallback"]
    assert "capture failed (operation not permitted" in ran.note and ran.note in capsys.readouterr().err
    assert all(a is not b for a, b in zip(step.generators, gens))
    for key, value in eager.state_dict().items():
        assert torch.equal(fell_back.state_dict()[key], value), key
    losses = [[e["loss"] for e in r.epochs] for r in results]
    assert len(losses) == len(seeds) and all(len(per_model) == RECIPE.epochs for per_model in losses)
    assert losses == [[e["loss"] for e in r.epochs] for r in eager_results]


def test_epoch_records_and_timing(small_space):
    """Each training keeps one record per epoch (the mean KD loss the steps returned, the learning
    rate, seconds, images/s, test top-1 on evaluated epochs) and splits its seconds into the loop, the
    test evaluations and the rest."""
    from ccfs_fast.data.loaders import ResidentEvalLoader
    from ccfs_fast.train.optim import lr_schedule

    student, teacher = (m.float() for m in _models(3))
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    step = RecordingLossStep(Single(student), Single(student), teacher, images, [torch.Generator().manual_seed(3)],
                             inv, shift, StepConfig(RECIPE, 4.0, fused_optimizer=False))
    seen = []
    test = ResidentEvalLoader(small_space, np.arange(N), 16, "cpu")
    (result,), _ = train_students(step, [3], BATCH, RECIPE, test, lambda e: e == 1,
                                  on_epoch=lambda m, r: seen.append((m, r)))
    assert [r["epoch"] for r in result.epochs] == [0, 1] and [m for m, _ in seen] == [0, 0]
    assert [r["lr"] for r in result.epochs] == lr_schedule(RECIPE)
    for epoch, record in enumerate(result.epochs):
        losses = step.losses[epoch * 6:(epoch + 1) * 6]
        expected = sum(loss * b for loss, b in losses) / N
        assert record["loss"] == pytest.approx(expected, rel=1e-9)
        assert record["seconds"] > 0 and record["img_per_s"] == pytest.approx(N / record["seconds"])
    assert result.epochs[0]["test_acc"] is None and result.epochs[1]["test_acc"] == result.accs[0][1]
    assert 0 < result.loop_s and 0 < result.eval_s and result.loop_s + result.eval_s <= result.seconds


class RecordingLossStep(TrainStep):
    """A TrainStep that remembers (loss, batch size) of every call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[tuple[float, int]] = []

    def __call__(self, rows):
        out = super().__call__(rows)
        self.losses.append((float(out[0]), rows.shape[1]))
        return out


def test_eval_fused_and_unfused_agree(finished_run, engine_data, tmp_path, capsys):
    """`eval --fuse-evals` and `--no-fuse-evals` on one selection: the same per-run accuracies."""
    accs = {}
    for flag in ("--fuse-evals", "--no-fuse-evals"):
        out = tmp_path / f"{flag}.json"
        assert main(["eval", "--pool", str(engine_data["pool"]), "--test", str(engine_data["test"]),
                     "--distilled", str(engine_data["distilled"]), "--teacher", str(engine_data["teacher"]),
                     "--eval-model", "convnet_small", "--selection", str(finished_run / "selected_indices.json"),
                     "--epochs", "3", "--lr", "0.05", "--lr-warmup-epochs", "1", "--num-eval", "3", "--seed", "5",
                     flag, "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["fused"] == (flag == "--fuse-evals")
        accs[flag] = result["accs"]
    largest = max(abs(a - b) for a, b in zip(accs["--fuse-evals"], accs["--no-fuse-evals"]))
    with capsys.disabled():
        print(f"\neval --fuse-evals vs --no-fuse-evals: largest per-run accuracy difference {largest:.4f} points")
    assert largest <= 0.5  # one test image of 200: float32 rounding may flip at most a near-tie


def test_batched_augmentation_is_each_models_own():
    """One grid_sample over M x b images gives each model, bit for bit, the batch its own pipeline
    gives (its generator's draws, its rows), in float32 and float64; the teacher stream exists only
    on CUDA."""
    from ccfs_fast.data.augment import augment_batch, draw_augmentation

    images = torch.randint(0, 256, (50, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    inv, shift = torch.full((1, 3, 1, 1), 1 / (255 * 0.25)), torch.full((1, 3, 1, 1), -2.0)
    rows = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, F64):
        students = FusedBank([_models(s)[0] for s in range(3)])
        step = TrainStep(students, students, _models(9)[1], images,
                         [torch.Generator().manual_seed(s) for s in (5, 6, 7)], inv, shift,
                         StepConfig(TrainRecipe(), 4.0, fused_optimizer=False, dtype=dtype))
        assert step.teacher_stream is None
        batched = step.augment(rows)
        alone = [augment_batch(images.index_select(0, rows[m]), draw_augmentation(7, torch.Generator().manual_seed(s),
                                                                                  dtype), inv, shift)
                 for m, s in enumerate((5, 6, 7))]
        assert batched.dtype == dtype and torch.equal(batched, torch.stack(alone))


def test_resident_test_evaluation_matches_the_ffcv_path(small_space):
    """The test set resident as uint8 and evaluated for all M models at once gives the accuracies
    the FFCV loader path gives, and reads nothing back to the host until the accuracies are read."""
    from ccfs_fast.data.loaders import EvalLoader, ResidentEvalLoader
    from ccfs_fast.train.loop import evaluate_students

    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model("convnet_tiny", 10, 8))
    bank = FusedBank(models)
    resident = ResidentEvalLoader(small_space, np.arange(N), 16, "cpu")
    streamed = EvalLoader(small_space, np.arange(N), 16, "cpu", 2)
    accs = evaluate_students(bank, resident)
    assert accs == evaluate_students(bank, streamed)
    alone = [evaluate_students(Single(m), resident)[0] for m in models]
    assert accs == alone and len(set(accs)) > 1  # each model its own accuracy
    with OpLog() as log:
        evaluate_students(bank, resident)
    reads = [op for op in log.ops if op in SYNC_OPS]
    assert len(reads) == 3 and set(reads) <= {"item", "_local_scalar_dense"}, reads  # one per accuracy, at the end


class LogitsRecordingStep(TrainStep):
    """A TrainStep that keeps the logits of its last call and the gradient the loss sends into the
    student's logits (what the optimiser's step is made of)."""

    def logits(self, rows):
        student, teacher, labels = super().logits(rows)
        self.seen = {"student": student.detach().clone(), "teacher": teacher.detach().clone()}
        student.register_hook(lambda grad: self.seen.__setitem__("grad", grad.detach().clone()))
        return student, teacher, labels


def _reference_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float):
    """The KD loss [M] and its gradient with respect to the student's logits, in float64, from the same logits."""
    s = student.double().requires_grad_()
    p_t = torch.softmax(teacher.double() / temperature, -1)
    loss = (p_t * (p_t.log() - torch.log_softmax(s / temperature, -1))).sum((1, 2)) / s.shape[1] * temperature ** 2
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


@pytest.mark.parametrize("closeness", [None, 1.0, 0.1])  # an untrained student, then one within 1.0 / 0.1
def test_a_bf16_steps_kd_loss_and_gradient_are_the_float32_ones(small_space, closeness):
    """Under --bf16 (autocast, on the CPU as on CUDA) the KD loss and its gradient with respect to the
    student's logits are those of float32 arithmetic on the logits the step produced: the teacher's logits
    are never rounded to bf16 for the loss. At T = 20 with a student near its teacher, a bf16 log_softmax
    of the teacher's side made the gradient's relative error 9-94%."""
    temperature = 20.0
    torch.manual_seed(100)
    teacher = create_model("convnet_tiny", 10, 8)
    with torch.no_grad():  # logits of a trained network's size (several units), not an untrained one's
        teacher.classifier.weight.mul_(40.0)
    teacher.eval()
    if closeness is None:
        torch.manual_seed(3)
        student = create_model("convnet_tiny", 10, 8)
    else:
        student = copy.deepcopy(teacher).train()
        with torch.no_grad():
            student.classifier.bias.add_(closeness * (torch.rand(10, generator=torch.Generator().manual_seed(1)) - 0.5))
    images = ResidentTrainLoader(small_space, np.arange(N), BATCH, "cpu", seed=3).images
    inv, shift = norm_tensors(small_space.norm, torch.device("cpu"))
    step = LogitsRecordingStep(Single(student), Single(student), teacher, images, [torch.Generator().manual_seed(3)],
                               inv, shift, StepConfig(RECIPE, temperature, fused_optimizer=False, bf16=True))
    losses = step(torch.arange(BATCH).view(1, BATCH))
    seen = step.seen
    assert seen["student"].dtype == seen["teacher"].dtype == torch.bfloat16  # both forwards ran in bf16
    gap = (seen["student"].float() - seen["teacher"].float()).abs().max().item()
    if closeness is not None:
        assert gap <= closeness  # the regime every filter reaches
    loss, grad = _reference_kd(seen["student"], seen["teacher"], temperature)
    assert losses.dtype == torch.float32 and seen["grad"].dtype == torch.bfloat16  # autograd casts it back to bf16
    # float32's own precision for a KL of near-equal distributions: a few ulps of each term p_t |log p_t|
    p_t = torch.softmax(seen["teacher"].double() / temperature, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean().item()
    bound = 16 * torch.finfo(torch.float32).eps * temperature ** 2 * entropy
    assert (losses.double() - loss).abs().max().item() <= bound + 1e-5 * loss.abs().max().item()
    s32 = seen["student"].float().requires_grad_()
    (float_grad,) = torch.autograd.grad(kd_losses(s32, seen["teacher"], temperature).sum(), s32)
    scale = grad.abs().max().item()
    assert (float_grad.double() - grad).abs().max().item() <= 1e-4 * scale  # float32 precision of the gradient
    # what reaches the student: the float32 gradient, rounded once to the logits' bf16
    torch.testing.assert_close(seen["grad"], float_grad.to(torch.bfloat16), rtol=0, atol=0)
