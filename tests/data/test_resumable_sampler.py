from itertools import islice

import pytest
import torch

from dinov2.data.samplers import ResumableInfiniteSampler

# 37 images and a global batch of 8: batches straddle epoch boundaries (37 is not a multiple of 8).
DATASET_SIZE, GLOBAL_BATCH, SEED = 37, 8, 5


def global_batch(step: int, world_size: int, start_step: int = 0) -> list[int]:
    """The global batch at `step`, assembled from every rank of a sampler of this world size."""
    ranks = [
        ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, rank=r, world_size=world_size,
                                 start_step=start_step)
        for r in range(world_size)
    ]  # fmt: skip
    return [index for sampler in ranks for index in sampler.indices_at(step)]


def test_stream_is_one_seeded_randperm_per_epoch():
    expected = torch.cat(
        [torch.randperm(DATASET_SIZE, generator=torch.Generator().manual_seed(SEED + e)) for e in range(3)]
    )
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED)
    stream = [i for step in range(13) for i in sampler.indices_at(step)]  # 104 samples: epochs 0, 1 and 2
    assert stream == expected[:104].tolist()
    assert sorted(stream[:DATASET_SIZE]) == list(range(DATASET_SIZE))  # each epoch sees every image once


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batches_do_not_depend_on_world_size(world_size):
    for step in range(20):
        assert global_batch(step, world_size) == global_batch(step, 1)


def test_each_rank_takes_its_contiguous_slice():
    whole = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED).indices_at(4)
    rank2 = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, rank=2, world_size=4)
    assert rank2.per_rank_batch_size == 2
    assert rank2.positions_at(4) == range(36, 38)
    assert rank2.indices_at(4) == whole[4:6]


def test_iteration_continues_step_after_step_from_the_start_step():
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, rank=1, world_size=2, start_step=7)
    expected = [i for step in (7, 8, 9) for i in sampler.indices_at(step)]
    assert list(islice(iter(sampler), 12)) == expected


@pytest.mark.parametrize("resume_world_size", [1, 2, 4])
def test_resume_on_any_world_size_sees_the_uninterrupted_stream(resume_world_size):
    uninterrupted = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED)
    first_run = list(islice(iter(uninterrupted), 20 * GLOBAL_BATCH))
    saved = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, world_size=2)
    saved.step = 11
    state = saved.state_dict()
    resumed = [
        ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, rank=r, world_size=resume_world_size)
        for r in range(resume_world_size)
    ]
    for sampler in resumed:
        sampler.load_state_dict(state)
    per_rank = GLOBAL_BATCH // resume_world_size
    streams = [list(islice(iter(sampler), 9 * per_rank)) for sampler in resumed]
    rebuilt = [i for step in range(9) for stream in streams for i in stream[step * per_rank : (step + 1) * per_rank]]
    assert rebuilt == first_run[11 * GLOBAL_BATCH :]


def test_far_steps_are_computed_without_materialising_the_stream():
    step = 10**15  # position 8e15: epoch 2.16e14 of a 37-image dataset
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED)
    epoch, offset = divmod(step * GLOBAL_BATCH, DATASET_SIZE)
    permutation = torch.randperm(DATASET_SIZE, generator=torch.Generator().manual_seed(SEED + epoch))
    assert offset + GLOBAL_BATCH <= DATASET_SIZE
    assert sampler.indices_at(step) == permutation[offset : offset + GLOBAL_BATCH].tolist()


def test_batch_larger_than_the_dataset_spans_several_epochs():
    sampler = ResumableInfiniteSampler(3, 8, seed=0)
    perms = [torch.randperm(3, generator=torch.Generator().manual_seed(e)).tolist() for e in range(3)]
    assert sampler.indices_at(0) == (perms[0] + perms[1] + perms[2])[:8]


def test_state_dict_round_trip_and_mismatch_errors():
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, start_step=42)
    assert sampler.state_dict() == {"step": 42, "seed": SEED, "dataset_size": DATASET_SIZE, "global_batch_size": 8}
    other = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, world_size=4, rank=3)
    other.load_state_dict(sampler.state_dict())
    assert other.step == 42
    with pytest.raises(ValueError, match="seed=6"):
        ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=6).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="dataset_size=37"):
        ResumableInfiniteSampler(40, GLOBAL_BATCH, seed=SEED).load_state_dict(sampler.state_dict())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="global_batch_size 10 is not divisible by world_size 4"):
        ResumableInfiniteSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="rank 4 is not in"):
        ResumableInfiniteSampler(100, 8, rank=4, world_size=4)
    with pytest.raises(ValueError, match="dataset_size must be positive"):
        ResumableInfiniteSampler(0, 8)
    with pytest.raises(ValueError, match="start_step"):
        ResumableInfiniteSampler(10, 8, start_step=-1)
