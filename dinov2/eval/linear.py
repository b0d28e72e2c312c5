"""Linear probe: the reference's grid of linear heads on frozen features, trained in one pass.

The grid is (feature view) x (learning rate): views are the CLS token of the last 1 or 4 blocks, with
or without the mean patch token of the last block; 13 learning rates from 1e-5 to 0.1, scaled by
batch/256; SGD momentum 0.9, cosine schedule, zero weight decay. Every head sees the same batches.

Unlike the reference, which picks the best head on the split it then reports, the head is selected
on a validation split carved (stratified, seeded) from train; the test split is touched once, by
the selected head only. Heads train on pre-extracted features (no augmentation): the backbone runs
once per image, which is what makes the probe affordable on a CPU.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def probe_views(
    n_stored_blocks: int, dim: int, n_last_blocks: Sequence[int] = (1, 4), avgpool: Sequence[bool] = (False, True)
) -> dict[str, tuple[int, int]]:
    """Column ranges of ``probe_tokens`` output ([CLS x n_stored, oldest first; mean patch]) per view.

    A block count above what the model has is clipped to it (a 2-block model has no "last 4").
    """
    views = {}
    for blocks in sorted({min(n, n_stored_blocks) for n in n_last_blocks}):
        for pooled in avgpool:
            start = (n_stored_blocks - blocks) * dim
            stop = (n_stored_blocks + (1 if pooled else 0)) * dim
            views[f"blocks{blocks}{'_avgpool' if pooled else ''}"] = (start, stop)
    return views


def carve_validation(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): ``fraction`` of every class (at least one where it has two)."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1) if len(members) > 1 else 0
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


@dataclass(frozen=True)
class HeadConfig:
    view: str
    learning_rate: float

    @property
    def name(self) -> str:
        return f"{self.view}_lr{self.learning_rate:g}"


@dataclass
class LinearProbeResult:
    selected: HeadConfig
    test_top1: float
    val_top1: dict[str, float]  # per head name, the selection criterion
    heads: list[HeadConfig]
    n_train: int
    n_val: int


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def _check(train_tokens, train_labels, test_tokens, test_labels) -> int:
    if train_tokens.shape[1] != test_tokens.shape[1]:
        raise ValueError(f"train features have dim {train_tokens.shape[1]}, test features {test_tokens.shape[1]}")
    if len(train_labels) != len(train_tokens) or len(test_labels) != len(test_tokens):
        raise ValueError("every feature row needs one label")
    num_classes = int(train_labels.max()) + 1
    if int(test_labels.max()) >= num_classes:
        raise ValueError(
            f"the test split has class index {int(test_labels.max())} but train only {num_classes} classes"
        )
    return num_classes


def linear_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    views: Mapping[str, tuple[int, int]],
    *,
    learning_rates: Sequence[float],
    epochs: int,
    batch_size: int,
    val_fraction: float,
    seed: int = 0,
) -> LinearProbeResult:
    """Train every (view, lr) head on train minus a validation split; report the val-best head on test."""
    num_classes = _check(train_tokens, train_labels, test_tokens, test_labels)
    fit_index, val_index = carve_validation(train_labels, val_fraction, seed)
    torch.manual_seed(seed)
    heads = [HeadConfig(view, lr) for view in views for lr in learning_rates]
    layers = nn.ModuleList(nn.Linear(views[h.view][1] - views[h.view][0], num_classes) for h in heads)
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)
    groups = [
        {"params": layer.parameters(), "lr": h.learning_rate * batch_size / 256}
        for h, layer in zip(heads, layers, strict=True)
    ]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(fit_index) / batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    generator = torch.Generator().manual_seed(seed)
    fit_tokens, fit_labels = train_tokens[fit_index].float(), train_labels[fit_index]
    for _ in range(epochs):
        order = torch.randperm(len(fit_index), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs, targets = fit_tokens[batch], fit_labels[batch]
            loss = sum(
                F.cross_entropy(layer(inputs[:, slice(*views[h.view])]), targets)
                for h, layer in zip(heads, layers, strict=True)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        val_tokens, val_labels = train_tokens[val_index].float(), train_labels[val_index]
        val_top1 = {
            h.name: _accuracy(layer(val_tokens[:, slice(*views[h.view])]), val_labels)
            for h, layer in zip(heads, layers, strict=True)
        }
        best = max(range(len(heads)), key=lambda i: (val_top1[heads[i].name], -i))
        chosen = heads[best]
        test_top1 = _accuracy(layers[best](test_tokens[:, slice(*views[chosen.view])].float()), test_labels)
    return LinearProbeResult(chosen, test_top1, val_top1, heads, len(fit_index), len(val_index))
