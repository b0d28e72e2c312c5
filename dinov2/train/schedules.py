"""Per-iteration schedules of the recipe: lr, weight decay, teacher momentum and temperature."""

import math
from dataclasses import dataclass

import numpy as np

from dinov2.configuration.recipes import Recipe


class CosineScheduler:
    """``freeze_iters`` at 0, then a linear warmup from ``start_warmup_value`` to ``base_value``, then a
    cosine from ``base_value`` to ``final_value`` over the remaining iterations; ``final_value`` after."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ):
        freeze_iters, warmup_iters = min(freeze_iters, total_iters), min(warmup_iters, total_iters)
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
        n_cosine = max(total_iters - warmup_iters - freeze_iters, 0)
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.final_value = final_value
        self.schedule = np.concatenate((freeze, warmup, cosine))[:total_iters]

    def zeroed_before(self, iterations: int) -> "CosineScheduler":
        """The same schedule held at 0 for the first ``iterations`` (not shifted)."""
        copy = object.__new__(CosineScheduler)
        copy.final_value = self.final_value
        copy.schedule = self.schedule.copy()
        copy.schedule[:iterations] = 0.0
        return copy

    def __getitem__(self, iteration: int) -> float:
        if iteration >= len(self.schedule):
            return self.final_value
        return float(self.schedule[iteration])


def scaled_lr(recipe: Recipe) -> float:
    ratio = recipe.train.batch_size / 1024.0
    rule = recipe.optim.scaling_rule
    if rule == "sqrt_wrt_1024":
        return recipe.optim.base_lr * math.sqrt(ratio)
    if rule == "linear_wrt_1024":
        return recipe.optim.base_lr * ratio
    return recipe.optim.base_lr


@dataclass
class Schedules:
    lr: CosineScheduler
    last_layer_lr: CosineScheduler
    weight_decay: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler

    def at(self, iteration: int) -> dict[str, float]:
        return {
            "lr": self.lr[iteration],
            "last_layer_lr": self.last_layer_lr[iteration],
            "wd": self.weight_decay[iteration],
            "momentum": self.momentum[iteration],
            "teacher_temp": self.teacher_temp[iteration],
        }


def build_schedules(recipe: Recipe) -> Schedules:
    per_epoch = recipe.train.iterations_per_epoch
    total = recipe.total_iterations
    optim, teacher = recipe.optim, recipe.teacher
    lr_options = dict(
        base_value=scaled_lr(recipe),
        final_value=optim.min_lr,
        total_iters=total,
        warmup_iters=int(optim.warmup_epochs * per_epoch),
        start_warmup_value=0.0,
    )
    lr = CosineScheduler(**lr_options)
    return Schedules(
        lr=lr,
        # the prototypes stay still at first: a moving last layer early on destabilises training
        last_layer_lr=lr.zeroed_before(int(optim.freeze_last_layer_epochs * per_epoch)),
        weight_decay=CosineScheduler(optim.weight_decay, optim.weight_decay_end, total),
        momentum=CosineScheduler(teacher.momentum_teacher, teacher.final_momentum_teacher, total),
        teacher_temp=CosineScheduler(
            teacher.teacher_temp,
            teacher.teacher_temp,
            total,
            warmup_iters=int(teacher.warmup_teacher_temp_epochs * per_epoch),
            start_warmup_value=teacher.warmup_teacher_temp,
        ),
    )
