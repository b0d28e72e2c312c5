"""The training engine: DINOv2 pretraining and distillation with DeepSpeed ZeRO, from one CPU process
to many GPUs.

One engine for every objective and launcher (none, torchrun, deepspeed): ``run_training(build, ...)``
with an ``Objective`` (``SSLMetaArch`` for ``pretrain``, the distillation arch for ``distill``).
Each iteration: schedules -> teacher targets -> student loss -> backward -> per-module clip (every
ZeRO stage) -> step -> EMA updates. Resumes from the newest DeepSpeed checkpoint in ``output/checkpoints`` at the
data position it was saved at: crops and masks are functions of (seed, position), and the
per-iteration RNG (drop path) is reseeded from (seed, iteration, rank), so a resumed run on the same
world size is bitwise identical on CPU to an uninterrupted one.
"""

import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.loaders import derived_seed, make_pretraining_loader
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import ResumableInfiniteSampler
from dinov2.hub.export import write_atomically
from dinov2.layers import Block
from dinov2.loss.distributed import all_reduce_sum
from dinov2.tracking import tracked_run
from dinov2.train.activation_checkpointing import checkpoint_blocks
from dinov2.train.clipping import clip_per_module
from dinov2.train.collapse import CollapseMonitor
from dinov2.train.config import DeepSpeedSection, Recipe
from dinov2.train.distributed import barrier, init_distributed, launched_rank
from dinov2.train.param_groups import apply_schedules
from dinov2.train.schedules import build_schedules
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.teacher import export_models, keep_in_fp32, load_ema_state, save_ema_state, update_emas

logger = logging.getLogger(__name__)

_ITERATION_RNG_STREAM = 2
EMA_STATE_FILE = "ema_and_centers.safetensors"
LOG_EVERY = 10  # iterations between log lines (the progress bar shows every one on a terminal)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update was applied."""


@dataclass
class RunResult:
    iteration: int
    metrics: dict[str, float]
    output_dir: Path


def open_dataset(path: str | Path, transform):
    """A folder of images (any layout) or a Parquet manifest written by the curation stages."""
    # imported here: the step's pieces (and the step benchmark) import this module on machines
    # that train on synthetic or in-memory batches and have no pyarrow
    from dinov2.data.datasets import ImageFolderDataset, ManifestDataset

    path = Path(path)
    if path.suffix == ".parquet":
        return ManifestDataset(path, transform=transform)
    return ImageFolderDataset(path, transform=transform)


def make_collate(recipe: Recipe) -> partial:
    """Batches of crops with iBOT block masks over half of the global-crop patch grid at most."""
    grid = recipe.crops.global_crops_size // recipe.student.patch_size
    return partial(
        collate_data_and_cast,
        mask_ratio_tuple=recipe.ibot.mask_ratio_min_max,
        mask_probability=recipe.ibot.mask_sample_probability,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=grid, max_num_patches=0.5 * grid * grid),
    )


def zero_optimization(section: DeepSpeedSection) -> dict[str, Any]:
    """ZeRO's settings. ``offload_optimizer: cpu`` keeps the optimizer state (Adam moments, 8 bytes per
    parameter, and in DeepSpeed's bf16 mode the fp32 master weights) in pinned CPU memory, where DeepSpeed's
    CPU Adam steps it."""
    zero: dict[str, Any] = {"stage": section.zero_stage, "stage3_param_persistence_threshold": 0}
    if section.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def deepspeed_config(recipe: Recipe, world_size: int, device_type: str = "cuda") -> dict[str, Any]:
    """DeepSpeed's configuration for a run on ``world_size`` devices of ``device_type`` (the dry runs
    describe CUDA runs).

    The step's bf16 autocast is DeepSpeed's ``torch_autocast``: the engine's forward turns off on CUDA an
    autocast entered around it unless that section is on. ``lower_precision_safe_modules`` is empty, so
    gradients are reduced in the parameters' own dtype, as without it."""
    config = {
        "train_batch_size": recipe.train.batch_size,
        "train_micro_batch_size_per_gpu": recipe.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed would clip one global norm; the engine clips each module instead (clipping.py)
        "gradient_clipping": 0.0,
        "zero_optimization": zero_optimization(recipe.deepspeed),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.deepspeed.precision == "deepspeed_bf16":
        config["bf16"] = {"enabled": True}
    if precision_dtype(recipe, torch.device(device_type)) is not None:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


def precision_mode(recipe: Recipe, device: torch.device) -> str:
    """``deepspeed.precision`` with ``auto`` resolved: autocast_bf16 on CUDA, fp32 elsewhere."""
    precision = recipe.deepspeed.precision
    if precision == "auto":
        return "autocast_bf16" if device.type == "cuda" else "fp32"
    return precision


def precision_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the step's forward: bf16 in both bf16 modes, None in fp32.

    Under ``deepspeed_bf16`` autocast still runs the forward: it casts the fp32 crops for the bf16 weights
    and runs the fp32 EMAs (the teacher) in bf16 without a second copy of their weights.
    """
    return None if precision_mode(recipe, device) == "fp32" else torch.bfloat16


def build_adamw(groups: list[dict], recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW over the objective's groups with the recipe's kernel; ``auto`` takes the fused
    kernel on CUDA (one launch for every tensor) and torch's default elsewhere."""
    if recipe.deepspeed.offload_optimizer == "cpu":
        # the offloaded state is stepped where it lives: DeepSpeed's CPU Adam (a C++ op compiled on first
        # use) in its AdamW mode; DeepSpeed refuses torch's optimizers with offload
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2), adamw_mode=True)
    implementation = recipe.optim.adamw_implementation
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "default"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    return torch.optim.AdamW(
        groups, betas=(recipe.optim.adamw_beta1, recipe.optim.adamw_beta2), **kernel.get(implementation, {})
    )


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` every transformer block of ``model``; returns how many. A block compiles once per
    input structure (the student's list of global and local crops, the teacher's global crops). Blocks,
    not the whole model: the masking, the heads, the losses and DeepSpeed's work between blocks (ZeRO-3
    gathers each block's weights in module hooks) stay in eager mode."""
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def initialize_engine(
    objective: "Objective", recipe: Recipe, device: torch.device, world_size: int, load_universal: bool = False
):
    """The DeepSpeed engine and optimizer over ``objective`` with the recipe's block options (activation
    checkpointing, compile), AdamW kernel, ZeRO stage and precision."""
    import deepspeed

    if recipe.train.activation_checkpointing:
        checkpoint_blocks(objective.clip_units())
    if recipe.train.compile:
        if device.type == "cuda" and recipe.deepspeed.precision == "deepspeed_bf16":
            logger.warning(
                "train.compile with deepspeed.precision=deepspeed_bf16: on CUDA these steps drifted from fp32 "
                "(5% after 6 steps, the loss rising; not on CPU); autocast_bf16 or eager blocks are safer"
            )
        compile_blocks(objective)
    optimizer = build_adamw(objective.optimizer_groups(), recipe, device)
    objective.to(device)
    config = deepspeed_config(recipe, world_size, device.type)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    if recipe.deepspeed.precision == "deepspeed_bf16":
        keep_in_fp32(objective.ema_state().values())
    return engine, optimizer


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
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    partial_target = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial_target, ignore_errors=True)
    arguments = argparse.Namespace(
        input_folder=str(source), output_folder=str(partial_target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    ds_to_universal.main(arguments)
    shutil.rmtree(target, ignore_errors=True)
    partial_target.rename(target)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def backbone_knn(backbone: torch.nn.Module, root: Path, recipe: Recipe, device: torch.device) -> dict[str, float]:
    """Weighted kNN (the evaluation suite's) of a backbone's CLS token on <root>/train vs <root>/test."""
    from dinov2.data.transforms import make_eval_transform
    from dinov2.eval.datasets import LabelledImageFolder
    from dinov2.eval.features import extract_features
    from dinov2.eval.knn import knn_classify

    size = recipe.crops.global_crops_size
    transform = make_eval_transform(resize_size=size, crop_size=size)

    def subset(split: str, limit: int):
        dataset = LabelledImageFolder(root / split, transform=transform)
        stride = max(len(dataset) // limit, 1)
        return torch.utils.data.Subset(dataset, list(range(0, len(dataset), stride))[:limit])

    evaluation = recipe.evaluation
    train_features, train_labels = extract_features(
        backbone, subset("train", evaluation.knn_max_train_images), device=device
    )
    test_features, test_labels = extract_features(
        backbone, subset("test", evaluation.knn_max_test_images), device=device
    )
    return knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20))


class Objective(Protocol):
    """What a meta-architecture supplies to the engine (``SSLMetaArch``, the distillation arch).

    The engine owns the data, DeepSpeed, the schedules, checkpoints, exports and tracking; the
    objective owns the models, the loss and which modules are EMAs of which.
    """

    stage: str  # MLflow experiment dinov2/<stage>, the progress bar's label

    def forward(self, batch: dict[str, Any], teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def optimizer_groups(self) -> list[dict]:
        """AdamW parameter groups with ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``."""

    def clip_units(self) -> list[torch.nn.Module]:
        """Modules whose gradients are clipped each to ``optim.clip_grad`` (backbone, each head)."""

    def ema_pairs(self) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
        """(trained module, its EMA) pairs updated after every step with the momentum schedule."""

    def ema_state(self) -> dict[str, torch.nn.Module]:
        """Modules whose state the optimizer does not hold (EMAs, loss centers): saved beside every
        checkpoint in a world-size-independent file."""

    def exports(self) -> dict[str, torch.nn.ModuleDict]:
        """Run-folder-relative folder -> backbone + heads written as safetensors (the final models)."""

    def knn_backbones(self) -> dict[str, torch.nn.Module]:
        """Metric prefix -> backbone whose kNN accuracy is reported at the start and the end."""


@dataclass
class Tracking:
    """How a run appears in MLflow."""

    stage: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


class MetricsHistory:
    """``plots/train.csv``: one row per iteration (``step`` then every logged value), for DVC plots and
    the report. A resumed run drops the rows after its checkpoint, so each step appears once."""

    def __init__(self, path: Path, start: int, enabled: bool):
        self.path, self.columns, self.handle = path, None, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and start > 0:
            lines = path.read_text().splitlines()
            if lines:
                self.columns = lines[0].split(",")[1:]
                kept = [line for line in lines[1:] if int(line.split(",")[0]) <= start]
                kept.insert(0, lines[0])
        path.write_text("".join(f"{line}\n" for line in kept))
        self.handle = path.open("a")

    def append(self, step: int, values: dict[str, float]) -> None:
        if self.handle is None:
            return
        if self.columns is None:
            self.columns = sorted(values)
            self.handle.write(",".join(["step", *self.columns]) + "\n")
        self.handle.write(
            ",".join([str(step), *(f"{values.get(key, float('nan')):.6g}" for key in self.columns)]) + "\n"
        )
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _knn_metrics(objective: Objective, root: Path, recipe: Recipe, device: torch.device, suffix: str = ""):
    metrics = {}
    for prefix, backbone in objective.knn_backbones().items():
        for key, value in backbone_knn(backbone, root, recipe, device).items():
            metrics[f"{prefix}{key}{suffix}"] = value
    return metrics


def _mlflow_run_file(output_dir: Path) -> Path:
    return output_dir / "mlflow_run_id"


def run_training(
    build: Callable[[], Objective],
    recipe: Recipe,
    data: str | Path,
    output_dir: str | Path,
    tracking: Tracking,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
    collate: Callable | None = None,
) -> RunResult:
    """Train (or resume) ``build()``'s objective until the recipe's last iteration, or ``max_iterations``
    more in this call. The objective is built right after seeding, so its initialisation is the seed's."""

    output_dir = Path(output_dir)
    rank, world_size = launched_rank()
    if recipe.train.batch_size % world_size:
        raise ValueError(f"train.batch_size {recipe.train.batch_size} is not divisible by the world size {world_size}")
    knn_source = knn_data or recipe.evaluation.knn_dataset
    knn_root = Path(knn_source) if knn_source else None
    if knn_root is not None and not (knn_root / "train").is_dir():
        raise FileNotFoundError(f"kNN dataset {knn_root} needs train/ and test/ class folders")
    crops = recipe.crops
    augmentation = DataAugmentationDINO(
        crops.global_crops_scale, crops.local_crops_scale, crops.local_crops_number,
        crops.global_crops_size, crops.local_crops_size, blur_probabilities=crops.blur_probabilities,
    )  # fmt: skip
    dataset = open_dataset(data, augmentation)
    collate = collate or make_collate(recipe)
    # Work that may take minutes on one rank and not the others (a manifest's index, a universal
    # checkpoint) is done before the process group exists, so no collective can time out waiting.
    checkpoints = output_dir / "checkpoints"
    load_dir, tag = resume_source(checkpoints, world_size, rank)
    _, _, device = init_distributed()

    torch.manual_seed(recipe.train.seed)
    objective = build()
    universal = load_dir is not None and load_dir != checkpoints
    engine, optimizer = initialize_engine(objective, recipe, device, world_size, load_universal=universal)
    schedules = build_schedules(recipe)
    sampler = ResumableInfiniteSampler(
        len(dataset), recipe.train.batch_size, seed=recipe.train.seed, rank=rank, world_size=world_size
    )
    start = 0
    if tag is not None:
        _, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if load_dir != checkpoints:
            load_ema_state(objective.ema_state(), checkpoints / tag / EMA_STATE_FILE)
        start = int(client_state["iteration"])
        sampler.load_state_dict(client_state["sampler"])
        logger.info("resumed from %s at iteration %d", load_dir / tag, start)
    loader = make_pretraining_loader(
        dataset, sampler, recipe.train.batch_size // world_size, collate, num_workers=recipe.train.num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip

    total = recipe.total_iterations
    stop = total if max_iterations is None else min(total, start + max_iterations)
    is_writer = rank == 0
    metrics: dict[str, float] = {}
    if is_writer:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n")
    run_file = _mlflow_run_file(output_dir)
    resumed_run = run_file.read_text().strip() if start > 0 and run_file.is_file() else None
    clip_units = objective.clip_units()
    ema_pairs = objective.ema_pairs()
    metadata = {"recipe": recipe.name}

    with tracked_run(
        tracking.stage, recipe=recipe.name, config=recipe.model_dump(mode="json"), run_name=tracking.run_name,
        tags=tracking.tags, resume_run_id=resumed_run,
    ) as tracker:  # fmt: skip
        if tracker.active and tracker.run_id == resumed_run:
            tracker.set_tags({f"dinov2.resumed_at_{start}": f"world size {world_size}"})
        elif tracker.active:
            write_atomically(run_file, lambda tmp: tmp.write_text(tracker.run_id + "\n"))
            run_params = {"run.world_size": world_size, "run.device": device.type, "run.data": str(data)}
            tracker.log_params({**run_params, **tracking.params})
        if knn_root is not None and start == 0:
            metrics.update(_knn_metrics(objective, knn_root, recipe, device, suffix="_init"))
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=0)
        if start == 0:
            for folder, models in objective.exports().items():
                export_models(
                    models, output_dir / "exports" / "iter_0000000" / folder, is_writer, {**metadata, "iteration": 0}
                )
        history = MetricsHistory(output_dir / "plots" / "train.csv", start, enabled=is_writer)
        watch = recipe.monitor
        monitor = CollapseMonitor(
            watch.window, watch.entropy_threshold, watch.cosine_threshold, watch.grace_iterations, watch.stop
        )
        objective.train()
        progress = Progress(
            TextColumn(tracking.stage), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not is_writer,
        )  # fmt: skip
        skipped_images = 0
        step_metrics: dict[str, float] = {}  # the last iteration's, reported at the end
        with progress:
            task = progress.add_task(tracking.stage, total=stop, completed=start, status="")
            batches = iter(loader)
            iteration = start
            while iteration < stop:
                tick = time.perf_counter()
                values = schedules.at(iteration)
                apply_schedules(optimizer.param_groups, values["lr"], values["last_layer_lr"], values["wd"])
                batch = next(batches)
                # unreadable images dropped from this step's batch; summed over ranks with the losses below
                skipped = torch.tensor([float(batch.pop("n_skipped", 0))])
                if device.type == "cuda":
                    skipped = skipped.pin_memory()
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                torch.manual_seed(derived_seed(recipe.train.seed, _ITERATION_RNG_STREAM, iteration, rank))
                loss, parts = engine(batch, values["teacher_temp"])  # under the recipe's autocast (deepspeed_config)
                # The loop's one read-back from the device per step: a single all-reduce of the losses
                # (logged as means over ranks, so curves do not depend on rank 0's batch) and of the skipped
                # images, read before the backward pass. A sum over ranks is finite only if every rank's
                # loss is, so it also decides for every rank whether to stop before the update.
                names = ["total_loss", *parts]
                summed = all_reduce_sum(
                    torch.cat([
                        torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float(),
                        skipped.to(device, non_blocking=True),
                    ])
                ).tolist()  # fmt: skip
                if not math.isfinite(summed[0]):
                    last = latest_complete_tag(checkpoints)
                    raise NonFiniteLossError(
                        f"loss is {summed[0] / world_size} at iteration {iteration}: stopped before updating the "
                        f"weights; last good checkpoint: {checkpoints / last if last else 'none'}"
                    )
                skipped_images += int(summed[-1])
                engine.backward(loss)
                if recipe.optim.clip_grad > 0:
                    clip_per_module(clip_units, recipe.optim.clip_grad)
                engine.step()
                update_emas(ema_pairs, values["momentum"])
                iteration += 1
                seconds = time.perf_counter() - tick

                means = [value / world_size for value in summed[:-1]]
                step_metrics = {f"train/{name}": mean for name, mean in zip(names, means, strict=True)}
                step_metrics.update({
                    "train/lr": values["lr"], "train/wd": values["wd"],
                    "train/momentum": values["momentum"], "train/teacher_temp": values["teacher_temp"],
                    "train/images_per_second": recipe.train.batch_size / seconds,
                    "train/peak_memory_gib": peak_memory_gib(device), "train/skipped_images": skipped_images,
                })  # fmt: skip
                tracker.log_metrics(step_metrics, step=iteration)
                for warning in monitor.update(
                    iteration, {k.removeprefix("train/"): v for k, v in step_metrics.items()}
                ):
                    tracker.set_tags({"dinov2.collapse": warning[:5000]})
                history.append(iteration, {k.removeprefix("train/"): v for k, v in step_metrics.items()})
                progress.update(task, completed=iteration, status=f"loss {step_metrics['train/total_loss']:.3f}")
                if is_writer and (iteration % LOG_EVERY == 0 or iteration == stop):
                    logger.info(
                        "iteration %d/%d  loss %.4f  lr %.2e  %.1f img/s  %.2f GiB",
                        iteration, total, step_metrics["train/total_loss"], values["lr"],
                        step_metrics["train/images_per_second"],
                        step_metrics["train/peak_memory_gib"],
                    )  # fmt: skip

                knn_every = recipe.evaluation.knn_every_n_iterations
                if knn_root is not None and knn_every and iteration % knn_every == 0 and iteration < total:
                    knn = _knn_metrics(objective, knn_root, recipe, device)
                    tracker.log_metrics({f"train/{k}": v for k, v in knn.items()}, step=iteration)
                    objective.train()
                if iteration % recipe.checkpoint.every_n_iterations == 0 or iteration == stop:
                    save_checkpoint(
                        engine, objective.ema_state(), checkpoints, iteration, sampler, recipe.checkpoint.keep_last,
                        is_writer,
                    )  # fmt: skip
                if iteration % recipe.checkpoint.export_every_n_iterations == 0 or iteration == total:
                    for folder, models in objective.exports().items():
                        export_models(models, output_dir / "exports" / f"iter_{iteration:07d}" / folder, is_writer,
                                      {**metadata, "iteration": iteration})  # fmt: skip
        history.close()
        metrics.update({k.removeprefix("train/"): v for k, v in step_metrics.items()})
        metrics.update(monitor.summary())
        if iteration == total:
            finals = [
                export_models(models, output_dir / folder, is_writer, {**metadata, "iteration": iteration})
                for folder, models in objective.exports().items()
            ]
            if knn_root is not None:
                knn = _knn_metrics(objective, knn_root, recipe, device)
                metrics.update(knn)
                tracker.log_metrics({f"train/{k}": v for k, v in knn.items()}, step=iteration)
            if is_writer:
                for final in finals:
                    tracker.log_artifact(final, final.relative_to(output_dir).as_posix())
        if is_writer:
            metrics["iteration"] = iteration
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    barrier()
    return RunResult(iteration, metrics, output_dir)


def pretrain(
    recipe: Recipe,
    data: str | Path,
    output_dir: str | Path,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
) -> RunResult:
    """DINOv2 pretraining (or its resumption) until the recipe's last iteration, or ``max_iterations``."""
    tracking = Tracking(stage="pretrain", run_name=f"{recipe.name} {date.today().isoformat()}")
    return run_training(
        lambda: SSLMetaArch(recipe), recipe, data, output_dir, tracking, max_iterations=max_iterations,
        knn_data=knn_data,
    )  # fmt: skip


def save_checkpoint(
    engine, ema_state: dict[str, torch.nn.Module], folder: Path, iteration: int, sampler, keep_last: int,
    is_writer: bool,
) -> None:  # fmt: skip
    """A DeepSpeed checkpoint with the data position and the EMA/center state; older ones beyond
    ``keep_last`` are removed. DeepSpeed moves ``latest`` to a tag only after writing it, so the
    EMA file is written first and a killed save never looks complete."""
    tag = f"iter_{iteration:07d}"
    save_ema_state(ema_state, folder / tag / EMA_STATE_FILE, is_writer)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"iteration": iteration, "sampler": sampler.state_dict()})
    barrier()
    if is_writer:
        for old in checkpoint_tags(folder)[:-keep_last]:
            shutil.rmtree(folder / old, ignore_errors=True)
        # a converted copy of the checkpoint this run resumed from is not needed once it has its own
        shutil.rmtree(folder / "universal", ignore_errors=True)
