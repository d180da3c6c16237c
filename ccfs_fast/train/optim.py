"""The recipe's optimisers and learning-rate schedules: registries by name, and the learning rate of each
epoch (torch's own schedulers, stepped once per epoch)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ccfs_fast.train.recipe import TrainRecipe

OPTIMIZER_FACTORIES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    # weight decay on all parameters, as the paper's script (utils.set_weight_decay without norm
    # groups); `impl` is {"fused": True} (one kernel per step) or {"foreach": True}; `lr` a float or,
    # for fused SGD, a device tensor.
    "sgd": lambda p, r, lr, impl: torch.optim.SGD(p, lr=lr, momentum=r.momentum, weight_decay=r.weight_decay,
                                                  **impl),
    "sgd_nesterov": lambda p, r, lr, impl: torch.optim.SGD(p, lr=lr, momentum=r.momentum,
                                                           weight_decay=r.weight_decay, nesterov=True, **impl),
    "rmsprop": lambda p, r, lr, impl: torch.optim.RMSprop(p, lr=lr, momentum=r.momentum,
                                                          weight_decay=r.weight_decay, eps=0.0316, alpha=0.9,
                                                          foreach=True),  # no fused RMSprop
    "adamw": lambda p, r, lr, impl: torch.optim.AdamW(p, lr=lr, weight_decay=r.weight_decay, **impl),
}

SCHEDULER_FACTORIES: dict[str, Callable[[torch.optim.Optimizer, TrainRecipe], torch.optim.lr_scheduler.LRScheduler]] = {
    "cosineannealinglr": lambda o, r: torch.optim.lr_scheduler.CosineAnnealingLR(
        o, T_max=r.epochs - r.lr_warmup_epochs, eta_min=0.0),
    "steplr": lambda o, r: torch.optim.lr_scheduler.StepLR(o, step_size=r.lr_step_size, gamma=r.lr_gamma),
    "exponentiallr": lambda o, r: torch.optim.lr_scheduler.ExponentialLR(o, gamma=r.lr_gamma),
}

WARMUP_FACTORIES = {
    "linear": lambda o, r: torch.optim.lr_scheduler.LinearLR(o, start_factor=r.lr_warmup_decay,
                                                             total_iters=r.lr_warmup_epochs),
    "constant": lambda o, r: torch.optim.lr_scheduler.ConstantLR(o, factor=r.lr_warmup_decay,
                                                                 total_iters=r.lr_warmup_epochs),
}


def make_optimizer(model: nn.Module, recipe: TrainRecipe, fused: bool = False,
                   lr: float | torch.Tensor | None = None) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s parameters; `lr` overrides recipe.lr (a device tensor
    for fused SGD inside a CUDA graph)."""
    impl = {"fused": True} if fused else {"foreach": True}
    return OPTIMIZER_FACTORIES[recipe.opt](model.parameters(), recipe, recipe.lr if lr is None else lr, impl)


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: TrainRecipe) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up for lr_warmup_epochs, then the main schedule; call .step() once per epoch."""
    main = SCHEDULER_FACTORIES[recipe.lr_scheduler](optimizer, recipe)
    if recipe.lr_warmup_epochs == 0:
        return main
    warmup = WARMUP_FACTORIES[recipe.lr_warmup_method](optimizer, recipe)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[recipe.lr_warmup_epochs])


def lr_schedule(recipe: TrainRecipe) -> list[float]:
    """The learning rate of each epoch under the recipe's warm-up and schedule (torch's own
    schedulers, stepped once per epoch, as the plain loop does)."""
    probe = nn.Linear(1, 1)
    optimizer = make_optimizer(probe, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    out = []
    for _ in range(recipe.epochs):
        out.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
    return out
