import pytest
import torch
from torch import nn

from dinov2.train.clipping import clip_per_module


def module_with_gradient(values: list[float]) -> nn.Module:
    module = nn.Linear(len(values), 1, bias=False)
    module.weight.grad = torch.tensor([values])
    return module


def test_each_module_is_clipped_to_the_limit_on_its_own():
    # norms 5 and 1 with a limit of 2.5: the first is halved, the second untouched. One global norm
    # (sqrt(26) = 5.10) would have scaled both by 2.5 / 5.10 = 0.49.
    backbone, head = module_with_gradient([3.0, 4.0]), module_with_gradient([0.6, 0.8])
    norms = clip_per_module([backbone, head], max_norm=2.5)
    assert norms.tolist() == pytest.approx([5.0, 1.0])
    assert backbone.weight.grad[0].tolist() == pytest.approx([1.5, 2.0], rel=1e-6)
    assert head.weight.grad.tolist() == [[0.6000000238418579, 0.800000011920929]]  # float32 0.6, 0.8 as set


def test_a_module_without_gradients_counts_as_norm_zero():
    frozen = nn.Linear(2, 1)
    frozen.requires_grad_(False)
    head = module_with_gradient([0.0, 6.0])
    assert clip_per_module([frozen, head], max_norm=3.0).tolist() == pytest.approx([0.0, 6.0])
    assert head.weight.grad[0].tolist() == pytest.approx([0.0, 3.0], rel=1e-6)
