import functools
from itertools import islice

import pytest
import torch

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.datasets import ImageFolderDataset
from dinov2.data.loaders import make_pretraining_loader, sample_generator
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import ORDER, ResumableInfiniteSampler

SEED = 17
ORDER_STATE = {"seed": SEED, "order": ORDER}
TENSOR_KEYS = ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list", "masks_weight",
               "n_masked_patches")  # fmt: skip


def multicrop_dataset(root) -> ImageFolderDataset:
    # 28 px Fashion-MNIST images: global crops 32 and 2 local crops 16, as for a patch-4 tiny ViT (8x8 grid).
    augmentation = DataAugmentationDINO(local_crops_number=2, global_crops_size=32, local_crops_size=16)
    return ImageFolderDataset(root, transform=augmentation)


def collate() -> functools.partial:
    return functools.partial(collate_data_and_cast, mask_generator=MaskingGenerator(8, max_num_patches=32))


def loader(dataset, global_batch, rank=0, world_size=1, state=None, num_workers=0):
    sampler = ResumableInfiniteSampler(len(dataset), global_batch, seed=SEED, rank=rank, world_size=world_size)
    if state is not None:
        sampler.load_state_dict(state)
    return make_pretraining_loader(dataset, sampler, global_batch // world_size, collate(), num_workers=num_workers)


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a["step"] == b["step"] and a["upperbound"] == b["upperbound"] and a["n_skipped"] == b["n_skipped"]
        for key in TENSOR_KEYS:
            assert torch.equal(a[key], b[key]), key


def test_resumed_run_reproduces_the_uninterrupted_batches_bitwise(image_folder):
    dataset = multicrop_dataset(image_folder(20, 10) / "test")
    uninterrupted = list(islice(loader(dataset, 4), 6))
    assert [b["step"] for b in uninterrupted] == [0, 1, 2, 3, 4, 5]
    assert uninterrupted[0]["collated_global_crops"].shape == (8, 3, 32, 32)
    assert uninterrupted[0]["collated_local_crops"].shape == (8, 3, 16, 16)

    first_part = loader(dataset, 4)
    consumed = list(islice(first_part, 3))
    state = first_part.resumable_sampler.state_dict()
    assert state["step"] == 3  # three batches reached the training loop
    torch.manual_seed(12345)  # a different global RNG history must not matter
    resumed = list(islice(loader(dataset, 4, state=state), 3))
    assert_same_batches(consumed + resumed, uninterrupted)


def test_crops_do_not_depend_on_the_world_size(image_folder):
    dataset = multicrop_dataset(image_folder(20, 10) / "test")
    whole = next(iter(loader(dataset, 4)))
    # One rank of 4 samples stacks [s0..s3 crop 1, s0..s3 crop 2]; each rank of 2 stacks [its 2 crop 1, its 2 crop 2].
    for rank, rows in ((0, [0, 1, 4, 5]), (1, [2, 3, 6, 7])):
        part = next(iter(loader(dataset, 4, rank=rank, world_size=2)))
        assert torch.equal(part["collated_global_crops"], whole["collated_global_crops"][rows])
        assert torch.equal(part["collated_local_crops"], whole["collated_local_crops"][rows])


def test_unreadable_images_are_replaced_so_every_batch_is_full(folder_with_bad_files):
    augmentation = DataAugmentationDINO(local_crops_number=1, global_crops_size=32, local_crops_size=16)
    dataset = ImageFolderDataset(folder_with_bad_files, transform=augmentation)
    readable = [0, 1, 2]  # astronaut, coffee, chelsea; 3 and 4 are unreadable
    # 5 files, global batch 5 over 2 ranks would not divide: 4 over 2 ranks, 3 steps (12 positions)
    for rank in (0, 1):
        sampler = ResumableInfiniteSampler(len(dataset), 4, seed=SEED, rank=rank, world_size=2)
        batches = list(islice(loader(dataset, 4, rank=rank, world_size=2), 3))
        for batch in batches:
            assert batch["collated_global_crops"].shape == (4, 3, 32, 32)  # 2 images x 2 global crops
            indices = sampler.indices_at(batch["step"])
            # at least one unreadable image per unreadable index, more when a replacement was unreadable too
            assert batch["n_skipped"] >= sum(index not in readable for index in indices)
            for row, (index, position) in enumerate(zip(indices, sampler.positions_at(batch["step"]), strict=True)):
                # the crops of its position, of the image itself when it is readable, else of a readable one
                candidates = [index] if index in readable else readable
                crops = [dataset.load(i, generator=sample_generator(SEED, position))[0] for i in candidates]
                assert any(torch.equal(batch["collated_global_crops"][row], c["global_crops"][0]) for c in crops)
        # a resumed loader draws the same replacements
        resumed = list(islice(loader(dataset, 4, rank=rank, world_size=2, state={"step": 1, **ORDER_STATE}), 2))
        assert_same_batches(batches[1:], resumed)
    # rank 1 trains on images [1, 2], [4, 3], [0, 2]: both unreadable ones at step 1, where one of the
    # images drawn to replace them was unreadable too (pinned)
    assert [b["n_skipped"] for b in batches] == [0, 3, 0]


def test_a_dataset_with_nothing_readable_is_an_error_naming_the_problem(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, transform=DataAugmentationDINO(global_crops_size=32, local_crops_size=16))
    with pytest.raises(ValueError, match="the 64 images drawn to replace it .* are all unreadable"):
        next(iter(loader(dataset, 1)))


class GlobalRngDataset(torch.utils.data.Dataset):
    """A dataset without `load(index, generator=)`: its transform draws from torch's global RNG."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int):
        crops = {"global_crops": [torch.rand(3, 4, 4) + index for _ in range(2)], "local_crops": []}
        return crops, 0


def test_plain_datasets_are_reproducible_too_and_leave_the_global_rng_alone():
    collate_fn = functools.partial(collate_data_and_cast, n_tokens=4, mask_probability=0.0)
    make = functools.partial(ResumableInfiniteSampler, 10, 4, seed=SEED)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    uninterrupted = list(islice(make_pretraining_loader(GlobalRngDataset(), make(), 4, collate_fn), 4))
    assert torch.equal(torch.get_rng_state(), before)
    resumed = list(islice(make_pretraining_loader(GlobalRngDataset(), make(start_step=2), 4, collate_fn), 2))
    for a, b in zip(uninterrupted[2:], resumed, strict=True):
        assert torch.equal(a["collated_global_crops"], b["collated_global_crops"])
    assert not torch.equal(uninterrupted[0]["collated_global_crops"], uninterrupted[1]["collated_global_crops"])


def test_mismatched_sizes_are_named(folder_with_bad_files):
    dataset = ImageFolderDataset(folder_with_bad_files)
    sampler = ResumableInfiniteSampler(5, 8, world_size=2)
    with pytest.raises(ValueError, match="per_rank_batch_size 8 does not match the sampler's 8 / 2 = 4"):
        make_pretraining_loader(dataset, sampler, 8, collate())
    with pytest.raises(ValueError, match="the sampler covers 6 samples but the dataset has 5"):
        make_pretraining_loader(dataset, ResumableInfiniteSampler(6, 4), 4, collate())


@pytest.mark.slow
def test_two_workers_give_the_same_batches_as_none(image_folder):
    dataset = multicrop_dataset(image_folder(20, 10) / "test")
    in_process = list(islice(loader(dataset, 4), 5))
    with_workers = loader(dataset, 4, num_workers=2)
    from_workers = list(islice(with_workers, 5))
    assert_same_batches(in_process, from_workers)
    assert with_workers.resumable_sampler.step == 5
