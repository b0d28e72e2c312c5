import tracemalloc
from itertools import islice

import numpy as np
import pytest

from dinov2.data.samplers import EpochPermutation, ResumableInfiniteSampler

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


def test_stream_is_one_seeded_permutation_per_epoch():
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED)
    stream = [i for step in range(13) for i in sampler.indices_at(step)]  # 104 samples: epochs 0, 1 and 2
    # Pinned: the data order of every run with seed 5 over 37 images. Changing it changes what every
    # run trains on, and a checkpoint saved with the old order refuses to resume (ORDER).
    assert stream[:8] == [1, 36, 33, 20, 32, 10, 5, 12]
    assert stream[DATASET_SIZE : DATASET_SIZE + 8] == [19, 34, 27, 33, 8, 20, 11, 29]
    epochs = [stream[:37], stream[37:74]]
    assert all(sorted(epoch) == list(range(DATASET_SIZE)) for epoch in epochs)  # every image once per epoch
    assert epochs[0] != epochs[1]
    assert stream == [i for e in range(3) for i in EpochPermutation(DATASET_SIZE, SEED, e)(np.arange(37))][:104]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 63, 64, 65, 1000, 4097])
def test_each_epoch_permutation_is_a_bijection(size):
    for epoch in range(3):
        images = EpochPermutation(size, SEED, epoch)(np.arange(size))
        assert sorted(images.tolist()) == list(range(size))


def test_every_image_is_equally_likely_at_every_offset():
    # 10 images, 3,000 epochs: each (offset, image) pair is expected 300 times (std 16); a biased
    # permutation (e.g. too few rounds) puts some pairs far away.
    counts = np.zeros((10, 10), dtype=np.int64)
    for epoch in range(3000):
        counts[np.arange(10), EpochPermutation(10, SEED, epoch)(np.arange(10))] += 1
    print(f"(offset, image) counts from {counts.min()} to {counts.max()}")
    assert counts.min() > 230 and counts.max() < 370


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
    permutation = EpochPermutation(DATASET_SIZE, SEED, epoch)(np.arange(DATASET_SIZE))
    assert offset + GLOBAL_BATCH <= DATASET_SIZE
    assert sampler.indices_at(step) == permutation[offset : offset + GLOBAL_BATCH].tolist()


def test_a_step_of_a_huge_dataset_costs_memory_of_the_batch_not_of_the_dataset():
    # 10^12 images: one epoch as an index array would be 8 TB
    sampler = ResumableInfiniteSampler(10**12, 1024, seed=SEED, rank=3, world_size=4)
    tracemalloc.start()
    indices = sampler.indices_at(10**6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(indices)) == 256 and all(0 <= i < 10**12 for i in indices)
    assert peak < 1_000_000  # bytes; measured about 60 kB


def test_batch_larger_than_the_dataset_spans_several_epochs():
    sampler = ResumableInfiniteSampler(3, 8, seed=0)
    perms = [EpochPermutation(3, 0, e)(np.arange(3)).tolist() for e in range(3)]
    assert sampler.indices_at(0) == (perms[0] + perms[1] + perms[2])[:8]


def test_state_dict_round_trip_and_mismatch_errors():
    sampler = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, start_step=42)
    assert sampler.state_dict() == {
        "step": 42, "seed": SEED, "dataset_size": DATASET_SIZE, "global_batch_size": 8, "order": "feistel-6"
    }  # fmt: skip
    other = ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=SEED, world_size=4, rank=3)
    other.load_state_dict(sampler.state_dict())
    assert other.step == 42
    with pytest.raises(ValueError, match="seed=6"):
        ResumableInfiniteSampler(DATASET_SIZE, GLOBAL_BATCH, seed=6).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="dataset_size=37"):
        ResumableInfiniteSampler(40, GLOBAL_BATCH, seed=SEED).load_state_dict(sampler.state_dict())
    saved_by_randperm = {key: value for key, value in sampler.state_dict().items() if key != "order"}
    with pytest.raises(ValueError, match="saved with the data order 'randperm'"):
        other.load_state_dict(saved_by_randperm)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="global_batch_size 10 is not divisible by world_size 4"):
        ResumableInfiniteSampler(100, 10, world_size=4)
    with pytest.raises(ValueError, match="rank 4 is not in"):
        ResumableInfiniteSampler(100, 8, rank=4, world_size=4)
    with pytest.raises(ValueError, match="dataset_size must be positive"):
        ResumableInfiniteSampler(0, 8)
    with pytest.raises(ValueError, match="start_step"):
        ResumableInfiniteSampler(10, 8, start_step=-1)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ResumableInfiniteSampler(10, 8, seed=-1)
