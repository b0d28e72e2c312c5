import pytest
import torch

from dinov2.data.collate import collate_data_and_cast, stratified_mask_counts
from dinov2.data.masking import MaskingGenerator


def constant_sample(sample_id: int, n_local: int = 3) -> tuple[dict, int]:
    """Crops filled with a value that says which sample and crop they are: 10*s + c (globals), 100 + 10*s + c."""
    return (
        {
            "global_crops": [torch.full((3, 8, 8), 10.0 * sample_id + c) for c in range(2)],
            "local_crops": [torch.full((3, 4, 4), 100.0 + 10 * sample_id + c) for c in range(n_local)],
            "offsets": (),
        },
        sample_id,
    )


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crops_are_stacked_crop_major():
    batch = collate_data_and_cast([constant_sample(s) for s in range(3)], n_tokens=4, mask_probability=0.0)
    assert batch["collated_global_crops"].shape == (6, 3, 8, 8)
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]
    assert batch["collated_local_crops"].shape == (9, 3, 4, 4)
    assert batch["collated_local_crops"][:, 0, 0, 0].tolist() == [100, 110, 120, 101, 111, 121, 102, 112, 122]
    assert not batch["collated_masks"].any() and batch["collated_masks"].shape == (6, 4)
    assert batch["n_masked_patches"].tolist() == [0] and batch["upperbound"] == 0 and batch["n_skipped"] == 0


def test_one_masked_image_of_six_by_hand():
    # 6 global-crop images, mask_probability 1/6 -> int(6/6) = 1 masked image; ratio fixed at 0.5 of 16.
    masks = MaskingGenerator(4, max_num_patches=8)
    batch = collate_data_and_cast(
        [constant_sample(s) for s in range(3)], (0.5, 0.5), 1 / 6, torch.float32, mask_generator=masks,
        generator=seeded(0),
    )  # fmt: skip
    per_image = batch["collated_masks"].sum(dim=1)
    assert sorted(per_image.tolist()) == [0, 0, 0, 0, 0, 8]
    assert batch["upperbound"] == 8
    assert batch["n_masked_patches"].tolist() == [8]
    assert batch["masks_weight"].tolist() == [0.125] * 8
    image = int(per_image.argmax())
    expected_indices = [image * 16 + p for p in torch.nonzero(batch["collated_masks"][image]).flatten().tolist()]
    assert batch["mask_indices_list"].tolist() == expected_indices


def test_weights_are_one_over_the_masked_patches_of_each_image():
    masks = MaskingGenerator(8, max_num_patches=32)
    batch = collate_data_and_cast([constant_sample(s) for s in range(4)], mask_generator=masks, generator=seeded(3))
    collated = batch["collated_masks"]
    assert collated.shape == (8, 64) and collated.dtype == torch.bool
    per_image = collated.sum(dim=1)
    assert (per_image > 0).sum() == 4  # int(8 * 0.5) images are masked
    owner = batch["mask_indices_list"] // 64
    assert torch.allclose(batch["masks_weight"], 1.0 / per_image[owner].float())
    assert batch["masks_weight"].sum().item() == pytest.approx(4.0)  # each masked image weighs 1 in total
    assert batch["n_masked_patches"].item() == per_image.sum().item() == len(batch["mask_indices_list"])


def test_mask_ratios_are_stratified_over_the_range():
    # 8 images, 4 masked: strata [0.1, 0.2], [0.2, 0.3], [0.3, 0.4], [0.4, 0.5] of 100 patches.
    generator = seeded(0)
    draws = [stratified_mask_counts(8, 100, (0.1, 0.5), 0.5, generator) for _ in range(400)]
    assert all(upperbound == 20 + 30 + 40 + 50 for _, upperbound in draws)
    for i, (low, high) in enumerate([(10, 20), (20, 30), (30, 40), (40, 50)]):
        stratum = [counts[i] for counts, _ in draws]
        assert low <= min(stratum) <= low + 1 and high - 2 <= max(stratum) <= high
        assert abs(sum(stratum) / len(stratum) - (low + high) / 2) < 1.5  # uniform within: mean at the centre
    assert all(counts[4:] == [0, 0, 0, 0] for counts, _ in draws)


def test_masks_are_shuffled_over_the_images():
    masks = MaskingGenerator(4, max_num_patches=8)
    masked_positions = torch.zeros(6)
    generator = seeded(1)
    for _ in range(60):
        batch = collate_data_and_cast([constant_sample(s) for s in range(3)], mask_generator=masks, generator=generator)
        masked_positions += batch["collated_masks"].any(dim=1).float()
    assert masked_positions.sum() == 60 * 3
    assert (masked_positions > 10).all()  # each of the 6 slots is masked about 30 times of 60


def test_same_generator_seed_gives_the_same_batch():
    masks = MaskingGenerator(8, max_num_patches=32)
    first, second = (
        collate_data_and_cast([constant_sample(s) for s in range(4)], mask_generator=masks, generator=seeded(9))
        for _ in range(2)
    )
    assert torch.equal(first["collated_masks"], second["collated_masks"])


def test_unreadable_samples_are_dropped_and_counted():
    samples = [constant_sample(0), None, constant_sample(2), None]
    batch = collate_data_and_cast(samples, n_tokens=4, mask_probability=0.0, dtype=torch.bfloat16)
    assert batch["n_skipped"] == 2
    assert batch["collated_global_crops"][:, 0, 0, 0].tolist() == [0, 20, 1, 21]
    assert batch["collated_global_crops"].dtype == torch.bfloat16
    assert batch["collated_masks"].shape == (4, 4)
    with pytest.raises(ValueError, match="every one of the 2 samples of this batch was unreadable"):
        collate_data_and_cast([None, None], n_tokens=4)


def test_masking_needs_a_grid_size():
    with pytest.raises(ValueError, match="n_tokens or a mask_generator"):
        collate_data_and_cast([constant_sample(0)])
    with pytest.raises(ValueError, match="covers 16 patches but n_tokens is 64"):
        collate_data_and_cast([constant_sample(0)], n_tokens=64, mask_generator=MaskingGenerator(4, 8))
