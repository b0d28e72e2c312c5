"""Process-group set-up that works the same alone, under torchrun and under the deepspeed launcher."""

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_rank() -> tuple[int, int]:
    """(rank, world_size) as the launcher set them, before any process group exists; without a
    launcher, rank 0 of 1 with a free port on 127.0.0.1."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Without a launcher, a group of one on 127.0.0.1; NCCL on CUDA, gloo on CPU."""
    rank, world_size = launched_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return rank, world_size, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
