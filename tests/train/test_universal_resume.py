"""Resuming on another world size: the ranks other than 0 wait for the universal form on the file
system, with no process group, so no collective can time out while rank 0 converts."""

import threading
import time

import torch.distributed as dist

from dinov2.train.checkpoints import resume_source


def saved_on_two_ranks(checkpoints, tag="iter_0000004"):
    """The files that say where a checkpoint is and over how many ranks it was partitioned."""
    (checkpoints / tag).mkdir(parents=True)
    for rank in range(2):
        (checkpoints / tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (checkpoints / "latest").write_text(tag)


def test_a_rank_waits_for_the_universal_form_on_the_file_system(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    saved_on_two_ranks(checkpoints)
    found = {}
    waiting = threading.Thread(target=lambda: found.update(source=resume_source(checkpoints, world_size=3, rank=1)))
    waiting.start()
    time.sleep(1.5)
    assert waiting.is_alive()  # rank 0 has not finished converting
    (checkpoints / "universal" / "iter_0000004").mkdir(parents=True)
    (checkpoints / "universal" / "latest").write_text("iter_0000004")  # written last by rank 0
    waiting.join(timeout=10)
    assert found["source"] == (checkpoints / "universal", "iter_0000004")
    assert not dist.is_initialized()


def test_a_checkpoint_of_the_same_world_size_is_resumed_as_saved(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    assert resume_source(checkpoints, world_size=2, rank=1) == (None, None)
    saved_on_two_ranks(checkpoints)
    assert resume_source(checkpoints, world_size=2, rank=1) == (checkpoints, "iter_0000004")
