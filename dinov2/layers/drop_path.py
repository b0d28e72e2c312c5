"""Stochastic depth: drop a residual branch for whole samples.

Two equivalent-in-expectation forms:
- ``drop_path``: compute the branch for every sample, zero it for dropped ones (cheap to reason about).
- ``add_residual_on_kept_samples``: compute the branch only for the kept samples and add it back,
  scaled by batch/kept. With the 0.3-0.4 rates of the DINOv2 recipes this skips a third of the
  compute of every block, which is why the reference uses it above a rate of 0.1.
"""

from collections.abc import Callable

import torch


def drop_path(branch_output: torch.Tensor, rate: float) -> torch.Tensor:
    if rate <= 0.0:
        return branch_output
    keep_prob = 1.0 - rate
    shape = (branch_output.shape[0],) + (1,) * (branch_output.ndim - 1)
    keep = branch_output.new_empty(shape).bernoulli_(keep_prob)
    return branch_output * keep / keep_prob


def add_residual_on_kept_samples(
    x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], rate: float
) -> torch.Tensor:
    batch = x.shape[0]
    n_kept = max(int(batch * (1.0 - rate)), 1)
    kept = torch.randperm(batch, device=x.device)[:n_kept]
    residual = branch(x[kept])
    return torch.index_add(x, 0, kept, residual.to(x.dtype), alpha=batch / n_kept)
