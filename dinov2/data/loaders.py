"""The pretraining data loader: one batch per training step, every random draw a function of the seed.

Bitwise-reproducible resume needs randomness that does not depend on history. Here:
- the crops of a sample come from a torch.Generator seeded from (seed, the sample's position in
  the global data stream), so they are the same whatever the step we resumed at, the number of
  workers or the world size;
- the masks of a rank's batch come from a generator seeded from (seed, step, rank). Masks are
  drawn per rank batch (ratios are stratified over it, as in the reference), so they do depend on
  the world size, but not on history;
- an unreadable image is replaced by another image of the dataset, drawn from (seed, its position,
  attempt), with the crops of its position. Every rank's batch is full, as the centering and
  Sinkhorn-Knopp statistics (batch x world size) assume, and the replacement is the same on resume.
Each DataLoader item is a whole step's batch built by one worker; the DataLoader hands them out in
step order, and the sampler's `step` advances as batches reach the training loop.
"""

import inspect
from collections.abc import Callable, Iterator
from itertools import count
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dinov2.data.samplers import ResumableInfiniteSampler

_SAMPLE_STREAM = 0
_BATCH_STREAM = 1
_REPLACEMENT_STREAM = 3  # 2 is the training loop's per-iteration stream
# Draws allowed to replace one unreadable image: at 40% unreadable files all 64 fail once in 10^25.
MAX_REPLACEMENTS = 64


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixed from `seed` and keys (numpy's SeedSequence), so nearby keys give unrelated streams."""
    if seed < 0 or any(key < 0 for key in keys):
        raise ValueError(f"seeds and keys must be non-negative, got seed={seed} keys={keys}")
    words = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31 | int(words[1])) & ((1 << 63) - 1)


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator for the augmentation of the sample at `position` of the global data stream."""
    return torch.Generator().manual_seed(derived_seed(seed, _SAMPLE_STREAM, position))


def batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator for the masks of the batch of `rank` at `step`."""
    return torch.Generator().manual_seed(derived_seed(seed, _BATCH_STREAM, step, rank))


def _accepts_generator(function: Callable) -> bool:
    try:
        return "generator" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


class _StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose key is a training step and whose item is that step's collated batch."""

    def __init__(self, dataset: Any, sampler: ResumableInfiniteSampler, collate_fn: Callable, seed: int) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.seed = seed
        self.dataset_takes_generator = hasattr(dataset, "load")
        self.collate_takes_generator = _accepts_generator(collate_fn)

    def _sample(self, index: int, position: int) -> Any:
        if self.dataset_takes_generator:
            return self.dataset.load(index, generator=sample_generator(self.seed, position))
        # A plain dataset draws from torch's global RNG: seed it per sample, restore it afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, _SAMPLE_STREAM, position))
            return self.dataset[index]

    def _readable_sample(self, index: int, position: int) -> tuple[Any, int]:
        """The sample at `position` and how many unreadable images were met on the way to it."""
        sample = self._sample(index, position)
        attempt = 0
        while sample is None:
            if attempt == MAX_REPLACEMENTS:
                raise ValueError(
                    f"image {index} and the {MAX_REPLACEMENTS} images drawn to replace it (stream position "
                    f"{position}) are all unreadable: check the dataset's files"
                )
            index = derived_seed(self.seed, _REPLACEMENT_STREAM, position, attempt) % len(self.dataset)
            sample = self._sample(index, position)
            attempt += 1
        return sample, attempt

    def __getitem__(self, step: int) -> dict[str, Any]:
        positions = self.sampler.positions_at(step)
        drawn = [self._readable_sample(i, p) for i, p in zip(self.sampler.indices_at(step), positions, strict=True)]
        samples = [sample for sample, _ in drawn]
        generator = batch_generator(self.seed, step, self.sampler.rank)
        if self.collate_takes_generator:
            batch = self.collate_fn(samples, generator=generator)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(generator.initial_seed())
                batch = self.collate_fn(samples)
        batch["step"] = step
        batch["n_skipped"] = sum(unreadable for _, unreadable in drawn)
        return batch


class _Steps:
    """The steps to load, from the sampler's current step on (read when a new epoch of iteration starts)."""

    def __init__(self, sampler: ResumableInfiniteSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[int]:
        return count(self.sampler.step)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


class PretrainingLoader(DataLoader):
    """A DataLoader yielding one collated batch (with its "step") per training step, forever."""

    def __init__(self, step_batches: _StepBatches, num_workers: int, pin_memory: bool) -> None:
        super().__init__(
            step_batches,
            batch_size=None,
            sampler=_Steps(step_batches.sampler),
            collate_fn=_as_is,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(step_batches.seed),
        )
        self.resumable_sampler = step_batches.sampler

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            self.resumable_sampler.step = batch["step"] + 1
            yield batch


def make_pretraining_loader(
    dataset: Any,
    sampler: ResumableInfiniteSampler,
    per_rank_batch_size: int,
    collate_fn: Callable,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> PretrainingLoader:
    """Batches of `per_rank_batch_size` samples for this rank, starting at `sampler.step`.

    `dataset` should offer `load(index, generator=...)` (ImageFolderDataset, ManifestDataset) so
    its transform draws from the per-sample generator; `collate_fn` should accept `generator=`
    (e.g. `functools.partial(collate_data_and_cast, ...)`). Others are still reproducible: they
    run with torch's global RNG seeded the same way and restored afterwards. The sampler is
    infinite and unreadable images are replaced, so every batch is full; its "n_skipped" counts the
    unreadable images met while building it.
    """
    if per_rank_batch_size != sampler.per_rank_batch_size:
        raise ValueError(
            f"per_rank_batch_size {per_rank_batch_size} does not match the sampler's "
            f"{sampler.global_batch_size} / {sampler.world_size} = {sampler.per_rank_batch_size}"
        )
    if len(dataset) != sampler.dataset_size:
        raise ValueError(f"the sampler covers {sampler.dataset_size} samples but the dataset has {len(dataset)}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return PretrainingLoader(_StepBatches(dataset, sampler, collate_fn, sampler.seed), num_workers, pin_memory)
