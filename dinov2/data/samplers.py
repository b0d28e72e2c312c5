"""Which images each rank trains on at each step, independent of the world size and resumable exactly.

The global stream of dataset indices is the concatenation of one pseudo-random permutation of
[0, N) per epoch: stream position `p` is offset `p % N` of epoch `p // N` and holds the image
`EpochPermutation(N, seed, epoch)(p % N)`. Global step `s` trains on `stream[s * B : (s + 1) * B]`
(B = global batch size) and rank `r` of `W` takes the contiguous slice `[r * B / W, (r + 1) * B / W)`
of it. The global batches therefore do not depend on the world size, and a run resumed at step `s` on
any number of ranks sees exactly what an uninterrupted run would have seen. (The reference's infinite
sampler shards the stream by world size and does not restore its position on resume.)

The permutation is computed, not stored: a step's indices cost O(batch) time and memory whatever N
is. An epoch held as `randperm(N)` is 1.1 GB at 142M images, in every DataLoader worker of every rank.
"""

from collections.abc import Iterator
from itertools import count
from typing import Any

import numpy as np

# The data order a sampler state was saved with: resuming with another would change the stream.
ORDER = "feistel-6"
_ROUNDS = 6


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit (uint64, wrapping)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


class EpochPermutation:
    """A seeded bijection of [0, size): a balanced Feistel network over 2 * half_bits bits (the
    smallest such domain holding `size`, so at most 4 * size), applied again to any value that lands
    at or beyond `size` ("cycle walking", which keeps it a bijection of [0, size)). Each of the 6
    rounds mixes one half with a 64-bit key drawn from (seed, epoch)."""

    def __init__(self, size: int, seed: int, epoch: int) -> None:
        if size <= 0:
            raise ValueError(f"a permutation needs a positive size, got {size}")
        self.size = size
        self.half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, dtype=np.uint64)

    def _rounds(self, values: np.ndarray) -> np.ndarray:
        shift, mask = np.uint64(self.half_bits), np.uint64((1 << self.half_bits) - 1)
        left, right = values >> shift, values & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    def __call__(self, offsets: np.ndarray) -> np.ndarray:
        """Images at these offsets of the epoch (int64 in, int64 out)."""
        with np.errstate(over="ignore"):
            values = self._rounds(np.asarray(offsets, dtype=np.uint64))
            outside = values >= self.size
            while outside.any():
                values[outside] = self._rounds(values[outside])
                outside = values >= self.size
        return values.astype(np.int64)


class ResumableInfiniteSampler:
    """Dataset indices for one rank, step after step, forever; O(batch) work and memory per step.

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
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = start_step

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def positions_at(self, step: int) -> range:
        """Positions in the global stream that this rank trains on at `step`."""
        start = step * self.global_batch_size + self.rank * self.per_rank_batch_size
        return range(start, start + self.per_rank_batch_size)

    def indices_at(self, step: int) -> list[int]:
        """Dataset indices this rank trains on at `step`, in stream order."""
        positions = self.positions_at(step)
        epochs, offsets = np.divmod(np.arange(positions.start, positions.stop, dtype=np.int64), self.dataset_size)
        indices = np.empty_like(offsets)
        for epoch in np.unique(epochs).tolist():  # one, or a few when the batch straddles epochs
            in_epoch = epochs == epoch
            indices[in_epoch] = EpochPermutation(self.dataset_size, self.seed, epoch)(offsets[in_epoch])
        return indices.tolist()

    def __iter__(self) -> Iterator[int]:
        for step in count(self.step):
            yield from self.indices_at(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "global_batch_size": self.global_batch_size,
            "order": ORDER,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step; the world size may differ, the data stream may not."""
        for key in ("seed", "dataset_size", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]} but this sampler has "
                    f"{key}={getattr(self, key)}: resuming would train on a different data stream"
                )
        # states saved before the order was recorded come from one torch.randperm per epoch
        saved_order = state.get("order", "randperm")
        if saved_order != ORDER:
            raise ValueError(
                f"sampler state was saved with the data order {saved_order!r} but this sampler draws {ORDER!r}: "
                "resuming would train on a different data stream"
            )
        if "step" not in state or state["step"] < 0:
            raise ValueError(f"sampler state has no valid 'step': {state}")
        self.step = int(state["step"])
