"""The training engine: DINOv2 pretraining and distillation with DeepSpeed ZeRO, from one CPU process
to many GPUs.

One engine for every objective and launcher (none, torchrun, deepspeed): ``run_training(build, ...)``
with an ``Objective`` (``SSLMetaArch`` for ``pretrain``, the distillation arch for ``distill``).
Each iteration: schedules -> teacher targets -> student loss -> backward -> per-module clip (every
ZeRO stage) -> step -> EMA updates. Resumes from the newest DeepSpeed checkpoint in the run's state folder
(``output/checkpoints`` unless given elsewhere, ``checkpoints.py``) at the data position it was saved at. The
state folder holds all a resume needs (checkpoints, the MLflow run id, the metrics history up to each
checkpoint), so a run resumes even when its output folder was deleted, as ``dvc repro`` deletes a stage's
outputs before running it. Crops and masks are functions of (seed,
position), and the per-iteration RNG (drop path) is reseeded from (seed, iteration, rank), so a resumed run
on the same world size is bitwise identical on CPU to an uninterrupted one. The DeepSpeed engine, its
precision and optimizer are set up in ``engine.py``; ``monitoring.py`` writes ``plots/train.csv`` and the kNN
accuracies.
"""

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dinov2.atomic import write_atomically, write_json
from dinov2.configuration.recipes import Recipe
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.loaders import derived_seed, make_pretraining_loader
from dinov2.data.masking import MaskingGenerator
from dinov2.data.samplers import ResumableInfiniteSampler
from dinov2.loss.distributed import all_reduce_sum
from dinov2.tracking import Tracker, tracked_run
from dinov2.train.checkpoints import (
    EMA_STATE_FILE,
    checkpoint_tag,
    latest_complete_tag,
    resume_source,
    save_checkpoint,
)
from dinov2.train.clipping import clip_per_module
from dinov2.train.collapse import CollapseMonitor
from dinov2.train.distributed import barrier, init_distributed, launched_rank
from dinov2.train.engine import initialize_engine, peak_memory_gib
from dinov2.train.monitoring import MetricsHistory, knn_metrics
from dinov2.train.param_groups import apply_schedules
from dinov2.train.schedules import Schedules, build_schedules
from dinov2.train.teacher import export_models, load_ema_state, update_emas

logger = logging.getLogger(__name__)

_ITERATION_RNG_STREAM = 2
LOG_EVERY = 10  # iterations between log lines (the progress bar shows every one on a terminal)
HISTORY = Path("plots") / "train.csv"  # in the output folder
HISTORY_COPY = "train.csv"  # in each checkpoint: the history up to it
INITIAL_FILE = "initial_metrics.json"  # in the output folder: the kNN accuracies at initialisation
RUN_ID_FILE = "mlflow_run_id"  # in the state folder (for a resume) and the output folder


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update was applied."""


@dataclass
class RunResult:
    iteration: int
    metrics: dict[str, float]
    output_dir: Path
    start: int = 0  # the iteration this call started from (> 0: resumed)


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


def run_name(recipe: Recipe, output_dir: str | Path, phase: str = "") -> str:
    """An MLflow run's name: what trained (the recipe, the phase) and where its models are (the output folder),
    so that runs of one recipe into different folders are told apart in the runs table."""
    return " ".join(part for part in (recipe.name, phase, "->", Path(output_dir).as_posix()) if part)


@dataclass
class Tracking:
    """How a run appears in MLflow."""

    stage: str
    run_name: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)  # facts about the run, written into metrics.json


@dataclass
class Run:
    """A run set up and ready to train: the objective in its DeepSpeed engine, the data stream at the
    checkpoint's position, and the iterations this call trains (``start`` to ``stop``)."""

    recipe: Recipe
    objective: Any
    engine: Any
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    sampler: ResumableInfiniteSampler
    batches: Iterator
    device: torch.device
    rank: int
    world_size: int
    output_dir: Path
    checkpoints: Path  # the state folder: checkpoints, the MLflow run id
    start: int
    stop: int
    knn_root: Path | None
    initial: dict[str, float]  # the kNN accuracies at initialisation
    skipped_images: int = 0
    logged_through: int = 0  # the last iteration MLflow holds, from before a resume: not logged again

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def export(self, folder: Callable[[str], Path], iteration: int) -> list[Path]:
        return export_objective(self.objective, self.recipe, folder, iteration, self.is_writer)

    def knn(self, suffix: str = "") -> dict[str, float]:
        return knn_metrics(self.objective, self.knn_root, self.recipe, self.device, suffix)


def set_up(
    build: Callable[[], "Objective"],
    recipe: Recipe,
    data: str | Path,
    output_dir: Path,
    checkpoints: Path,
    max_iterations: int | None,
    knn_data: str | Path | None,
    collate: Callable | None,
) -> Run:
    """Everything before the first step, checked before any work: data, resume point, engine, the run's
    start (``begin``), data stream. Work that may take minutes on one rank and not the others (a manifest's
    index, a universal checkpoint) is done before the process group exists, so no collective can time out
    waiting."""
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
    load_dir, tag = resume_source(checkpoints, world_size, rank)
    # decided by every rank before any rank can write it (the engine's set-up below is collective)
    recorded = _initial_record(output_dir) if tag is not None else None
    _, _, device = init_distributed()

    torch.manual_seed(recipe.train.seed)
    objective = build()
    universal = load_dir is not None and load_dir != checkpoints
    engine, optimizer = initialize_engine(objective, recipe, device, world_size, load_universal=universal)
    schedules = build_schedules(recipe)
    sampler = ResumableInfiniteSampler(
        len(dataset), recipe.train.batch_size, seed=recipe.train.seed, rank=rank, world_size=world_size
    )
    initial = recorded if recorded is not None else begin(objective, recipe, device, knn_root, output_dir, rank == 0)
    start = 0
    if tag is not None:
        _, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        if universal:
            load_ema_state(objective.ema_state(), checkpoints / tag / EMA_STATE_FILE)
        start = int(client_state["iteration"])
        sampler.load_state_dict(client_state["sampler"])
        logger.info("resumed from %s at iteration %d", load_dir / tag, start)
        history = output_dir / HISTORY
        if rank == 0 and not history.is_file() and (checkpoints / tag / HISTORY_COPY).is_file():
            history.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(checkpoints / tag / HISTORY_COPY, history)
    loader = make_pretraining_loader(
        dataset, sampler, recipe.train.batch_size // world_size, collate or make_collate(recipe),
        num_workers=recipe.train.num_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    stop = recipe.total_iterations if max_iterations is None else min(recipe.total_iterations, start + max_iterations)
    return Run(
        recipe, objective, engine, optimizer, schedules, sampler, iter(loader), device, rank, world_size,
        output_dir, checkpoints, start, stop, knn_root, initial,
    )  # fmt: skip


def _initial_record(output_dir: Path) -> dict[str, float] | None:
    """The kNN accuracies at initialisation a run's start recorded in ``output_dir``; None when it has none
    (a fresh folder, or one that was deleted while the checkpoints survived)."""
    path = output_dir / INITIAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_objective(
    objective, recipe: Recipe, folder: Callable[[str], Path], iteration: int, is_writer: bool
) -> list[Path]:
    """The objective's models (``exports()``) written at ``folder(name)``, tagged with the recipe and iteration."""
    metadata = {"recipe": recipe.name, "iteration": iteration}
    return [export_models(models, folder(name), is_writer, metadata) for name, models in objective.exports().items()]


def begin(
    objective, recipe: Recipe, device: torch.device, knn_root: Path | None, output_dir: Path, is_writer: bool
) -> dict[str, float]:
    """What a run records of its models before the first step: their kNN accuracies and the iteration-0
    export. Done again before resuming into an output folder that lacks them, from the seed's initialisation
    (before the checkpoint is loaded), so a resumed run's outputs are those of an uninterrupted one."""
    initial = knn_metrics(objective, knn_root, recipe, device, "_init") if knn_root is not None else {}
    export_objective(objective, recipe, lambda name: output_dir / "exports" / checkpoint_tag(0) / name, 0, is_writer)
    if is_writer:
        write_json(initial, output_dir / INITIAL_FILE)
    return initial


def train_step(run: Run, iteration: int) -> dict[str, float]:
    """One iteration; returns its ``train/`` metrics (losses as means over ranks). Raises
    ``NonFiniteLossError`` before the update when the loss is NaN or infinite on any rank."""
    recipe, device = run.recipe, run.device
    tick = time.perf_counter()
    values = run.schedules.at(iteration)
    apply_schedules(run.optimizer.param_groups, values["lr"], values["last_layer_lr"], values["wd"])
    batch = next(run.batches)
    # unreadable images dropped from this step's batch; summed over ranks with the losses below
    skipped = torch.tensor([float(batch.pop("n_skipped", 0))])
    if device.type == "cuda":
        skipped = skipped.pin_memory()
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.manual_seed(derived_seed(recipe.train.seed, _ITERATION_RNG_STREAM, iteration, run.rank))
    loss, parts = run.engine(batch, values["teacher_temp"])  # under the recipe's autocast (engine.py)
    # The loop's one read-back from the device per step: a single all-reduce of the losses (logged as means
    # over ranks, so curves do not depend on rank 0's batch) and of the skipped images, read before the
    # backward pass. A sum over ranks is finite only if every rank's loss is, so it also decides for every
    # rank whether to stop before the update.
    names = ["total_loss", *parts]
    summed = all_reduce_sum(
        torch.cat([
            torch.stack([loss.detach(), *(v.detach() for v in parts.values())]).float(),
            skipped.to(device, non_blocking=True),
        ])
    ).tolist()  # fmt: skip
    if not math.isfinite(summed[0]):
        last = latest_complete_tag(run.checkpoints)
        raise NonFiniteLossError(
            f"loss is {summed[0] / run.world_size} at iteration {iteration}: stopped before updating the "
            f"weights; last good checkpoint: {run.checkpoints / last if last else 'none'}"
        )
    run.skipped_images += int(summed[-1])
    run.engine.backward(loss)
    if recipe.optim.clip_grad > 0:
        clip_per_module(run.objective.clip_units(), recipe.optim.clip_grad)
    run.engine.step()
    update_emas(run.objective.ema_pairs(), values["momentum"])
    seconds = time.perf_counter() - tick
    metrics = {f"train/{name}": value / run.world_size for name, value in zip(names, summed[:-1], strict=True)}
    metrics.update({
        "train/lr": values["lr"], "train/wd": values["wd"],
        "train/momentum": values["momentum"], "train/teacher_temp": values["teacher_temp"],
        "train/images_per_second": recipe.train.batch_size / seconds,
        "train/peak_memory_gib": peak_memory_gib(device), "train/skipped_images": run.skipped_images,
    })  # fmt: skip
    return metrics


def _open_run(run: Run, tracker: Tracker, tracking: Tracking, data: str | Path, run_file: Path) -> None:
    """Tag a resumed MLflow run, or record a new run's id (for a later resume) and its params. The id is
    also written in the output folder, for whoever reads the run folder."""
    if tracker.active and tracker.run_id == _resumed_run(run, run_file):
        tracker.set_tags({f"dinov2.resumed_at_{run.start}": f"world size {run.world_size}"})
    elif tracker.active:
        write_atomically(run_file, lambda tmp: tmp.write_text(tracker.run_id + "\n"))
        params = {"run.world_size": run.world_size, "run.device": run.device.type, "run.data": str(data)}
        tracker.log_params({**params, **tracking.params})
    if tracker.active and run.is_writer:
        write_atomically(run.output_dir / RUN_ID_FILE, lambda tmp: tmp.write_text(tracker.run_id + "\n"))


def _resumed_run(run: Run, run_file: Path) -> str | None:
    return run_file.read_text().strip() if run.start > 0 and run_file.is_file() else None


def _progress(stage: str, run: Run) -> Progress:
    return Progress(
        TextColumn(stage), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not run.is_writer,
    )  # fmt: skip


def _after_step(
    run: Run, iteration: int, metrics: dict[str, float], tracker: Tracker, history: MetricsHistory,
    monitor: CollapseMonitor,
) -> None:  # fmt: skip
    """Record iteration ``iteration`` (MLflow, train.csv, the collapse monitor, a log line), then do what falls
    due at it: the kNN probe, a checkpoint, an export."""
    recipe, total = run.recipe, run.recipe.total_iterations
    plain = {key.removeprefix("train/"): value for key, value in metrics.items()}
    if iteration > run.logged_through:
        tracker.log_metrics(metrics, step=iteration)
    for warning in monitor.update(iteration, plain):
        tracker.set_tags({"dinov2.collapse": warning[:5000]})
    history.append(iteration, plain)
    if run.is_writer and (iteration % LOG_EVERY == 0 or iteration == run.stop):
        logger.info(
            "iteration %d/%d  loss %.4f  lr %.2e  %.1f img/s  %.2f GiB", iteration, total, plain["total_loss"],
            plain["lr"], plain["images_per_second"], plain["peak_memory_gib"],
        )  # fmt: skip
    knn_every = recipe.evaluation.knn_every_n_iterations
    if run.knn_root is not None and knn_every and iteration % knn_every == 0 and iteration < total:
        knn = run.knn()
        if iteration > run.logged_through:
            tracker.log_metrics({f"train/{k}": v for k, v in knn.items()}, step=iteration)
        run.objective.train()
    if iteration % recipe.checkpoint.every_n_iterations == 0 or iteration == run.stop:
        tag = checkpoint_tag(iteration)
        if run.is_writer:  # the history up to this checkpoint, for a resume into a deleted output folder
            write_atomically(run.checkpoints / tag / HISTORY_COPY, lambda tmp: shutil.copyfile(history.path, tmp))
        save_checkpoint(
            run.engine, run.objective.ema_state(), run.checkpoints, iteration, run.sampler,
            recipe.checkpoint.keep_last, run.is_writer,
        )  # fmt: skip
    if iteration % recipe.checkpoint.export_every_n_iterations == 0 or iteration == total:
        run.export(lambda name: run.output_dir / "exports" / checkpoint_tag(iteration) / name, iteration)


def _finish(run: Run, iteration: int, tracker: Tracker) -> dict[str, float]:
    """At the recipe's last iteration: the final models (logged to MLflow) and their kNN accuracy."""
    if iteration != run.recipe.total_iterations:
        return {}
    finals = run.export(lambda name: run.output_dir / name, iteration)
    knn = run.knn() if run.knn_root is not None else {}
    if knn:
        tracker.log_metrics({f"train/{k}": v for k, v in knn.items()}, step=iteration)
    if run.is_writer:
        for final in finals:
            tracker.log_artifact(final, final.relative_to(run.output_dir).as_posix())
    return knn


def run_training(
    build: Callable[[], "Objective"],
    recipe: Recipe,
    data: str | Path,
    output_dir: str | Path,
    tracking: Tracking,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
    collate: Callable | None = None,
    checkpoints: str | Path | None = None,
) -> RunResult:
    """Train (or resume) ``build()``'s objective until the recipe's last iteration, or ``max_iterations``
    more in this call. The objective is built right after seeding, so its initialisation is the seed's.
    ``checkpoints``: the run's state folder (default ``output_dir/checkpoints``)."""
    output_dir = Path(output_dir)
    checkpoints = output_dir / "checkpoints" if checkpoints is None else Path(checkpoints)
    run = set_up(build, recipe, data, output_dir, checkpoints, max_iterations, knn_data, collate)
    if run.is_writer:
        write_json(recipe.model_dump(mode="json"), output_dir / "recipe.json", sort_keys=False)
    run_file = checkpoints / RUN_ID_FILE
    metrics: dict[str, float] = {**tracking.summary, **run.initial}
    step_metrics: dict[str, float] = {}  # the last iteration's, reported at the end
    with tracked_run(
        tracking.stage, recipe=recipe.name, config=recipe.model_dump(mode="json"), run_name=tracking.run_name,
        tags=tracking.tags, resume_run_id=_resumed_run(run, run_file),
    ) as tracker:  # fmt: skip
        _open_run(run, tracker, tracking, data, run_file)
        if run.start > 0:
            # steps logged after the checkpoint, before the run stopped, are in MLflow already: each step once
            run.logged_through = tracker.last_step("train/total_loss")
        if run.start == 0 and run.initial:
            tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=0)
        history = MetricsHistory(output_dir / HISTORY, run.start, enabled=run.is_writer)
        watch = recipe.monitor
        monitor = CollapseMonitor(
            watch.window, watch.entropy_threshold, watch.cosine_threshold, watch.grace_iterations, watch.stop
        )
        run.objective.train()
        iteration = run.start
        with _progress(tracking.stage, run) as progress:
            task = progress.add_task(tracking.stage, total=run.stop, completed=run.start, status="")
            while iteration < run.stop:
                step_metrics = train_step(run, iteration)
                iteration += 1
                _after_step(run, iteration, step_metrics, tracker, history, monitor)
                progress.update(task, completed=iteration, status=f"loss {step_metrics['train/total_loss']:.3f}")
        history.close()
        metrics.update({k.removeprefix("train/"): v for k, v in step_metrics.items()})
        metrics.update(monitor.summary())
        metrics.update(_finish(run, iteration, tracker))
        if run.is_writer:
            metrics["iteration"] = iteration
            write_json(metrics, output_dir / "metrics.json")
    barrier()
    return RunResult(iteration, metrics, output_dir, run.start)
