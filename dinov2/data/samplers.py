"""Which images each rank trains on at each step, independent of the world size and resumable exactly.

The global stream of dataset indices is the concatenation of one permutation per epoch,
`torch.randperm(dataset_size, generator seeded with seed + epoch)`. Global step `s` trains on
`stream[s * B : (s + 1) * B]` (B = global batch size) and rank `r` of `W` takes the contiguous slice
`[r * B / W, (r + 1) * B / W)` of it. The global batches therefore do not depend on the world size,
and a run resumed at step `s` on any number of ranks sees exactly what an uninterrupted run would
have seen. (The reference's infinite sampler shards the stream by world size and does not restore
its position on resume.)
"""

from collections.abc import Iterator
from itertools import count
from typing import Any

import torch


class ResumableInfiniteSampler:
    """Dataset indices for one rank, step after step, forever; O(batch) work per step.

    `step` is the next global step to hand out. The pretraining loader advances it as it delivers
    batches to the training loop (not as it prefetches), so `state_dict()` taken after training on
    step k records k + 1 and `load_state_dict` of it resumes at the following batch.
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError(f"dataset_size must be positive, got {dataset_size}")
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if global_batch_size % world_size != 0:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by world_size {world_size}: "
                "every rank must take the same number of samples per step"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = start_step
        # One epoch's permutation is kept: consecutive steps read the same epoch, so the O(N)
        # randperm is paid once per epoch, not per step.
        self._cached_epoch = -1
        self._cached_permutation = torch.empty(0, dtype=torch.long)

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def positions_at(self, step: int) -> range:
        """Positions in the global stream that this rank trains on at `step`."""
        start = step * self.global_batch_size + self.rank * self.per_rank_batch_size
        return range(start, start + self.per_rank_batch_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached_permutation = torch.randperm(self.dataset_size, generator=generator)
            self._cached_epoch = epoch
        return self._cached_permutation

    def indices_at(self, step: int) -> list[int]:
        """Dataset indices this rank trains on at `step`, in stream order."""
        positions = self.positions_at(step)
        indices: list[int] = []
        position = positions.start
        while position < positions.stop:
            epoch, offset = divmod(position, self.dataset_size)
            take = min(positions.stop - position, self.dataset_size - offset)
            indices.extend(self._permutation(epoch)[offset : offset + take].tolist())
            position += take
        return indices

    def __iter__(self) -> Iterator[int]:
        for step in count(self.step):
            yield from self.indices_at(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step; the world size may differ, the data stream may not."""
        for key in ("seed", "dataset_size", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}: resuming would train on a different data stream"
                )
        if "step" not in state or state["step"] < 0:
            raise ValueError(f"sampler state has no valid 'step': {state}")
        self.step = int(state["step"])
