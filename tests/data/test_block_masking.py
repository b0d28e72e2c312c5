import numpy as np
import pytest
import torch

from dinov2.data.masking import MaskingGenerator


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_request_on_a_16x16_grid_is_met_exactly():
    masks = MaskingGenerator(16, max_num_patches=128)  # the ViT/14 at 224 px setting of the reference
    for count in range(0, 257, 3):
        mask = masks(count, seeded(count))
        assert mask.shape == (16, 16) and mask.dtype == bool
        assert mask.sum() == count


def test_reference_behaviour_never_exceeds_and_mostly_meets_the_request():
    masks = MaskingGenerator(16, max_num_patches=128, fill_remainder=False)
    generator = seeded(0)
    counts = [int(c) for c in torch.randint(25, 128, (300,), generator=seeded(1))]
    achieved = [int(masks(c, generator).sum()) for c in counts]
    assert all(a <= c for a, c in zip(achieved, counts, strict=True))
    # 93% exact over 4000 masks (measured); these 300 seeded requests give 282 exact, the test asks > 240.
    assert sum(a == c for a, c in zip(achieved, counts, strict=True)) > 240


def test_a_first_block_is_one_rectangle_within_the_aspect_range():
    masks = MaskingGenerator(14, max_num_patches=40, min_aspect=0.3)
    for seed in range(200):
        mask = np.zeros((14, 14), dtype=bool)
        added = masks._add_block(mask, 40, seeded(seed))
        if added == 0:
            continue
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height * width == added == mask.sum()  # a solid rectangle
        assert 1 <= added <= 40  # never more than the budget
        assert height < 14 and width < 14
        # h = round(sqrt(A * a)), w = round(sqrt(A / a)) with a in [0.3, 1/0.3]: h/w is a up to rounding.
        assert (height - 0.5) / (width + 0.5) <= 1 / 0.3 and (height + 0.5) / (width - 0.5) >= 0.3


def test_aspect_one_gives_square_blocks():
    masks = MaskingGenerator(12, max_num_patches=30, min_aspect=1.0, max_aspect=1.0)
    sides = []
    for seed in range(50):
        mask = np.zeros((12, 12), dtype=bool)
        assert masks._add_block(mask, 30, seeded(seed)) > 0
        rows, cols = np.nonzero(mask)
        assert np.ptp(rows) == np.ptp(cols)
        sides.append(np.ptp(rows) + 1)
    assert set(sides) <= {2, 3, 4, 5}  # round(sqrt(U(4, 30))) is 2..5


def test_masks_are_a_function_of_the_generator_seed():
    masks = MaskingGenerator((6, 10), max_num_patches=20)
    assert np.array_equal(masks(17, seeded(7)), masks(17, seeded(7)))
    assert not np.array_equal(masks(17, seeded(7)), masks(17, seeded(8)))
    assert masks(17, seeded(7)).shape == (6, 10)


def test_zero_and_impossible_requests():
    masks = MaskingGenerator(4, max_num_patches=8)
    assert masks(0).sum() == 0
    assert masks(16, seeded(0)).all()  # the whole grid, although no block may span a full side
    with pytest.raises(ValueError, match="cannot mask 17 patches of a 4x4 grid"):
        masks(17)
    with pytest.raises(ValueError, match="max_num_patches"):
        MaskingGenerator(4, max_num_patches=0)
