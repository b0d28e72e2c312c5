"""Checkpoints of a training run: DeepSpeed's full training state, and where a run resumes from.

``<output>/checkpoints/iter_<N>/`` holds DeepSpeed's checkpoint (model, optimizer, the data position and
iteration as client state) and ``ema_and_centers.safetensors`` (the EMAs and loss centers, which the
optimizer does not hold, in a world-size-independent file). DeepSpeed moves ``latest`` to a tag only after
writing it, and the EMA file is written first, so a killed save never looks complete. A checkpoint
partitioned for another number of ranks is converted once to DeepSpeed's universal form and resumed from it.

``state_folder(root, recipe, ...)`` is where a run keeps that state when it must outlive its output folder
(``--checkpoints ROOT``): ``ROOT/<recipe name>-<key>``, the key a digest of the resolved recipe and of the
run's inputs. The same stage with the same inputs finds its checkpoints again; a changed key or input starts
fresh in a folder of its own, and the older folders stay until deleted.
"""

import argparse
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from dinov2.atomic import output_folder, write_atomically
from dinov2.train.distributed import barrier
from dinov2.train.teacher import save_ema_state

logger = logging.getLogger(__name__)

EMA_STATE_FILE = "ema_and_centers.safetensors"


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def checkpoint_tags(folder: Path) -> list[str]:
    """Complete checkpoints, oldest first (DeepSpeed writes ``latest`` only after a save completes)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("iter_"))


def latest_complete_tag(folder: Path) -> str | None:
    latest = folder / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def saved_world_size(checkpoint: Path) -> int | None:
    """Data-parallel size a ZeRO-1/2/3 checkpoint was partitioned for; None for ZeRO-0 (not partitioned)."""
    partitions = list(checkpoint.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(partitions) or None


def resume_source(checkpoints: Path, world_size: int, rank: int) -> tuple[Path | None, str | None]:
    """Where to resume from: the newest checkpoint as saved, or, when it was partitioned over another
    number of ranks, its DeepSpeed universal form (converted once, by rank 0, beside it).

    Called before the process group exists: converting a ViT-g checkpoint can take longer than a
    collective's timeout, so the other ranks wait for the converted folder on the file system
    rather than in a barrier (if rank 0 fails, the launcher ends them).
    """
    tag = latest_complete_tag(checkpoints)
    if tag is None:
        return None, None
    saved = saved_world_size(checkpoints / tag)
    if saved is None or saved == world_size:
        return checkpoints, tag
    universal = checkpoints / "universal"
    if rank == 0 and latest_complete_tag(universal) != tag:
        convert_to_universal(checkpoints / tag, universal / tag)
        write_atomically(universal / "latest", lambda tmp: tmp.write_text(tag))
    waited = time.monotonic()
    while latest_complete_tag(universal) != tag:
        if time.monotonic() - waited > 60:
            logger.info("rank %d: waiting for rank 0 to convert %s to its universal form", rank, tag)
            waited = time.monotonic()
        time.sleep(1.0)
    logger.info("checkpoint %s was saved on %d ranks; resuming on %d from its universal form", tag, saved, world_size)
    return universal, tag


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal: optimizer state re-sliced per parameter, loadable on any world size."""
    from deepspeed.checkpoint import ds_to_universal

    with output_folder(target) as partial_target:
        partial_target.rmdir()  # ds_to_universal makes the folder itself
        arguments = argparse.Namespace(
            input_folder=str(source), output_folder=str(partial_target), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        ds_to_universal.main(arguments)


def save_checkpoint(
    engine, ema_state: dict[str, torch.nn.Module], folder: Path, iteration: int, sampler, keep_last: int,
    is_writer: bool,
) -> None:  # fmt: skip
    """A DeepSpeed checkpoint with the data position and the EMA/center state; older ones beyond
    ``keep_last`` are removed. DeepSpeed moves ``latest`` to a tag only after writing it, so the
    EMA file is written first and a killed save never looks complete."""
    tag = checkpoint_tag(iteration)
    save_ema_state(ema_state, folder / tag / EMA_STATE_FILE, is_writer)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"iteration": iteration, "sampler": sampler.state_dict()})
    barrier()
    if is_writer:
        for old in checkpoint_tags(folder)[:-keep_last]:
            shutil.rmtree(folder / old, ignore_errors=True)
        # a converted copy of the checkpoint this run resumed from is not needed once it has its own
        shutil.rmtree(folder / "universal", ignore_errors=True)


def state_folder(root: Path, recipe, data: str | Path, models: list[str | Path | None]) -> Path:
    """``root/<recipe name>-<key>``: the key digests the resolved recipe (every key, so any params change
    starts fresh), the data (a manifest by its bytes; a folder by its files' relative paths and sizes, since
    reading every image would cost as much as an epoch) and the model files the run starts from (by their
    bytes: a retrained teacher has the same shapes and sizes)."""
    digest = hashlib.sha256(json.dumps(recipe.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(_input_digest(Path(data), content=Path(data).is_file()).encode())
    for model in models:
        if model is not None and Path(model).exists():
            digest.update(_input_digest(Path(model), content=True).encode())
    folder = Path(root) / f"{recipe.name}-{digest.hexdigest()[:12]}"
    others = [p.name for p in Path(root).glob(f"{recipe.name}-*") if p.is_dir() and p != folder]
    if others and not folder.is_dir():
        logger.info(
            "checkpoints in %s: a new folder for this recipe and these inputs; %d other folder(s) of runs with "
            "other params or inputs stay there until deleted (%s)", folder, len(others), ", ".join(sorted(others)),
        )  # fmt: skip
    return folder


def _input_digest(path: Path, content: bool) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        if content:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        else:
            digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()
