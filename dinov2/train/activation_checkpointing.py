"""Activation checkpointing of the trained transformer blocks (``train.activation_checkpointing``).

Each block keeps only its input for the backward pass and recomputes its attention and MLP
activations there: the student's activation memory drops from about 34 bytes x tokens x width per
block to the block inputs plus one block's worth, for one extra forward of the blocks. The block's
random draws (drop path) are replayed identically, so the loss and the gradients do not change.
"""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinov2.layers import Block


def _recomputed_forward(block: Block, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    forward = type(block).forward
    if isinstance(x, list):  # crops of different sizes, one checkpoint each
        return [checkpoint(forward, block, crop_tokens, use_reentrant=False) for crop_tokens in x]
    return checkpoint(forward, block, x, use_reentrant=False)


def checkpoint_blocks(modules: list[nn.Module]) -> int:
    """Make every transformer block inside ``modules`` recompute its activations in the backward
    pass; returns how many blocks were changed. Parameters and state-dict keys stay as they are."""
    blocks = [block for module in modules for block in module.modules() if isinstance(block, Block)]
    for block in blocks:
        block.forward = partial(_recomputed_forward, block)
    return len(blocks)
