"""``pretrain()``: DINOv2 pretraining from scratch, or continued from a trained backbone (``init.source``,
``continued.py``), on the training engine (``train.py``)."""

from pathlib import Path

from dinov2.configuration.recipes import Recipe
from dinov2.train.checkpoints import state_folder
from dinov2.train.continued import continue_pretraining
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import RunResult, Tracking, run_name, run_training


def pretrain(
    recipe: Recipe,
    data: str | Path,
    output_dir: str | Path,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
    checkpoints: str | Path | None = None,
) -> RunResult:
    """DINOv2 pretraining (or its resumption) until the recipe's last iteration, or ``max_iterations`` more. With
    ``init.source``, from that trained backbone, its heads fitted first when it has none. ``checkpoints``: a
    folder outside the output where the run keeps its state, keyed by the recipe and inputs (``state_folder``);
    default: ``output_dir/checkpoints``."""
    state = None if checkpoints is None else state_folder(Path(checkpoints), recipe, data, [recipe.init.source])
    if recipe.init.source is not None:
        return continue_pretraining(
            recipe, data, output_dir, max_iterations=max_iterations, knn_data=knn_data, checkpoints=state
        )
    tracking = Tracking(stage="pretrain", run_name=run_name(recipe, output_dir))
    return run_training(
        lambda: SSLMetaArch(recipe), recipe, data, output_dir, tracking, max_iterations=max_iterations,
        knn_data=knn_data, checkpoints=state,
    )  # fmt: skip
