"""BEiT block masking: which patches of a global crop the student sees replaced by the mask token."""

import math

import numpy as np
import torch


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator | None, low: int, high_inclusive: int) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator).item())


class MaskingGenerator:
    """Masks of `input_size` patches built from random rectangular blocks, as in BEiT and DINOv2.

    Each block covers about U(min_num_patches, remaining budget) patches with an aspect ratio drawn
    log-uniformly in [min_aspect, max_aspect] (max_aspect defaults to 1 / min_aspect), and must be
    strictly smaller than the grid in both directions. A block is accepted only if it adds at least
    one and at most the remaining number of patches, so a mask never exceeds the requested count.
    Blocks are added until the count is reached. The reference stops when ten random blocks in a
    row cannot be placed (typically 1-3 patches short, in about 7% of the masks of a 16x16 grid at
    ratios 0.1-0.5); with `fill_remainder=True` (default) the last few patches are instead added one
    at a time next to the existing blocks, so every request up to the grid size is met exactly.
    `fill_remainder=False` keeps the reference behaviour: fewer patches then, never more.

    Randomness comes from `generator` (a torch.Generator) when given, else from torch's global RNG,
    so a loader can make every mask a function of (seed, step, rank).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float,
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        fill_remainder: bool = True,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height <= 0 or width <= 0:
            raise ValueError(f"input_size must be positive patch counts, got {input_size}")
        if min_aspect <= 0 or (max_aspect is not None and max_aspect < min_aspect):
            raise ValueError(f"aspect range [{min_aspect}, {max_aspect}] is not a positive interval")
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches must be >= 1, got {max_num_patches}")
        self.height, self.width = int(height), int(width)
        self.num_patches = self.height * self.width
        self.max_num_patches = max_num_patches
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.fill_remainder = fill_remainder
        max_aspect = max_aspect if max_aspect is not None else 1 / min_aspect
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        aspects = tuple(round(math.exp(v), 3) for v in self.log_aspect_range)
        return (
            f"MaskingGenerator({self.height}x{self.width}, blocks of {self.min_num_patches}.."
            f"{self.max_num_patches} patches, aspect {aspects[0]}..{aspects[1]})"
        )

    def _add_block(self, mask: np.ndarray, budget: float, generator: torch.Generator | None) -> int:
        """Mask one random block adding between 1 and `budget` new patches; return how many it added."""
        for _ in range(10):
            target_area = _uniform(generator, self.min_num_patches, budget)
            aspect = math.exp(_uniform(generator, *self.log_aspect_range))
            block_height = int(round(math.sqrt(target_area * aspect)))
            block_width = int(round(math.sqrt(target_area / aspect)))
            if block_height >= self.height or block_width >= self.width:
                continue
            top = _randint(generator, 0, self.height - block_height)
            left = _randint(generator, 0, self.width - block_width)
            block = mask[top : top + block_height, left : left + block_width]
            added = block.size - int(block.sum())
            if 0 < added <= budget:
                block[:] = True
                return added
        return 0

    def _add_patch_next_to_blocks(self, mask: np.ndarray, generator: torch.Generator | None) -> None:
        """Mask one random unmasked patch touching the mask (any unmasked patch if none touches it)."""
        touching = np.zeros_like(mask)
        touching[1:] |= mask[:-1]
        touching[:-1] |= mask[1:]
        touching[:, 1:] |= mask[:, :-1]
        touching[:, :-1] |= mask[:, 1:]
        candidates = np.flatnonzero(touching & ~mask)
        if candidates.size == 0:
            candidates = np.flatnonzero(~mask)
        mask.flat[candidates[_randint(generator, 0, candidates.size - 1)]] = True

    def __call__(self, num_masking_patches: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
        """A (height, width) bool mask with `num_masking_patches` True entries (see the class for when fewer)."""
        target = self.num_masking_patches if num_masking_patches is None else num_masking_patches
        target = target or 0
        if not 0 <= target <= self.num_patches:
            raise ValueError(f"cannot mask {target} patches of a {self.height}x{self.width} grid")
        mask = np.zeros(self.shape, dtype=bool)
        masked = 0
        while masked < target:
            added = self._add_block(mask, min(target - masked, self.max_num_patches), generator)
            if added > 0:
                masked += added
            elif self.fill_remainder:
                self._add_patch_next_to_blocks(mask, generator)
                masked += 1
            else:
                break
        return mask
