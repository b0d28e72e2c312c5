"""Head fitting: DINO + iBOT heads for a trained backbone that has none (the released backbones ship without).

The recipe's pretraining objective with the backbone frozen (``SSLMetaArch(frozen_backbone=...)``): only the
heads and their EMA train, against the frozen backbone's own targets, with the recipe's schedules compressed
into ``head_fitting.iterations`` (every ``*_epochs`` key keeps its share of the run). It is a run of its own in
``OUT/head_fitting/``, resumable like any run and skipped once its export (``teacher/heads.safetensors``) exists;
MLflow tag ``dinov2.phase=head_fitting``. Used by distillation (a headless teacher) and by continued pretraining
(``init.source`` without heads).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dinov2.configuration import validate
from dinov2.configuration.recipes import HeadFittingSection, Recipe
from dinov2.models import DinoVisionTransformer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import RunResult, Tracking, run_training

logger = logging.getLogger(__name__)

HEAD_FITTING_FOLDER = "head_fitting"


def head_fitting_recipe(recipe: Recipe, fitting: HeadFittingSection, student: dict[str, Any]) -> Recipe:
    """The recipe's pretraining objective with its schedules compressed into ``fitting.iterations`` (every
    ``*_epochs`` key keeps its fraction of the run), heads sized by the recipe, the backbone described by
    ``student`` (a ``student`` section; no stochastic depth: the backbone is the teacher's)."""
    data = recipe.model_dump(mode="json", exclude={"distillation", "init"})
    fraction = 1.0 / recipe.optim.epochs
    data["name"] = f"{recipe.name}-head-fitting"
    data["train"]["iterations_per_epoch"] = fitting.iterations
    optim = data["optim"]
    optim.update(
        epochs=1, base_lr=fitting.base_lr or optim["base_lr"], warmup_epochs=optim["warmup_epochs"] * fraction,
        freeze_last_layer_epochs=optim["freeze_last_layer_epochs"] * fraction,
    )  # fmt: skip
    data["teacher"]["warmup_teacher_temp_epochs"] *= fraction
    if fitting.momentum_teacher is not None:
        data["teacher"]["momentum_teacher"] = fitting.momentum_teacher
    data["student"] = {**student, "drop_path_rate": 0.0, "pretrained_weights": None}
    data["checkpoint"]["every_n_iterations"] = min(data["checkpoint"]["every_n_iterations"], fitting.iterations)
    data["checkpoint"]["export_every_n_iterations"] = fitting.iterations
    data["evaluation"]["knn_dataset"] = None
    return validate(Recipe, data, "head fitting")


@dataclass
class HeadFitting:
    """The head-fitting phase as one call of a run met it."""

    heads_file: Path  # the fitted heads, complete once the file exists
    run: RunResult | None  # the head-fitting iterations this call ran (None: fitted by an earlier call)
    left: int | None  # what is left of the call's ``max_iterations`` for the next phase

    @property
    def stops_the_call(self) -> bool:
        """This call spent its iterations fitting: the run goes on from here when it is started again."""
        return self.run is not None and (not self.heads_file.is_file() or self.left == 0)


def fit_heads(
    fitting: Callable[[], Recipe],
    backbone: Callable[[], DinoVisionTransformer],
    data: str | Path,
    output_dir: Path,
    tracking: Tracking,
    max_iterations: int | None = None,
    checkpoints: Path | None = None,
) -> HeadFitting:
    """Train heads for the frozen ``backbone()`` with the head-fitting recipe ``fitting()`` in ``OUT/head_fitting/``
    (or resume there) until its last iteration or ``max_iterations`` more; nothing to do once its export exists.
    Both are called only when there is fitting to do. ``checkpoints``: the fitting's state folder (default
    ``OUT/head_fitting/checkpoints``)."""
    folder = output_dir / HEAD_FITTING_FOLDER
    heads_file = folder / "teacher" / "heads.safetensors"
    if heads_file.is_file():
        return HeadFitting(heads_file, None, max_iterations)
    recipe = fitting()
    frozen = backbone()
    logger.info("fitting DINO/iBOT heads on the frozen backbone: %d iterations in %s", recipe.total_iterations, folder)
    tracking = replace(tracking, tags={**tracking.tags, "dinov2.phase": "head_fitting"})
    result = run_training(
        lambda: SSLMetaArch(recipe, frozen_backbone=frozen), recipe, data, folder, tracking,
        max_iterations=max_iterations, checkpoints=checkpoints,
    )  # fmt: skip
    left = None if max_iterations is None else max_iterations - (result.iteration - result.start)
    return HeadFitting(heads_file, result, left)
