"""``distill()``: check the teacher against the recipe, fit heads when the teacher has none, then run
the training engine with the distillation objective."""

import logging
from pathlib import Path

from dinov2.configuration.recipes import DistillRecipe, Recipe
from dinov2.distill.meta_arch import DistillMetaArch
from dinov2.distill.teacher import TeacherError, TeacherSpec, inspect_teacher, load_teacher
from dinov2.train.checkpoints import state_folder
from dinov2.train.head_fitting import HEAD_FITTING_FOLDER, fit_heads, head_fitting_recipe
from dinov2.train.sources import read_heads
from dinov2.train.train import RunResult, Tracking, run_name, run_training

logger = logging.getLogger(__name__)


def check_token_grids(recipe: DistillRecipe, spec: TeacherSpec) -> None:
    """iBOT pairs every student patch token with the teacher's token at the same place: the global crops
    must cut both into the same grid."""
    size = recipe.crops.global_crops_size
    teacher_patch = spec.config["patch_size"]
    if size % teacher_patch:
        raise TeacherError(
            f"crops.global_crops_size {size} is not a multiple of the teacher's patch size {teacher_patch}"
        )
    for name, student in recipe.student_sections().items():
        if size // student.patch_size != size // teacher_patch:
            raise TeacherError(
                f"token grids do not line up: on {size} px global crops the teacher (patch {teacher_patch}) sees "
                f"{size // teacher_patch}x{size // teacher_patch} patches but student {name!r} (patch "
                f"{student.patch_size}) sees {size // student.patch_size}x{size // student.patch_size}; "
                f"give the student patch_size {teacher_patch}"
            )


def teacher_as_student(spec: TeacherSpec) -> dict:
    """The teacher's architecture as a ``student`` section (what head fitting trains heads for)."""
    config = spec.config
    return {
        "arch": "custom", "embed_dim": config["embed_dim"], "depth": config["depth"], "num_heads": config["num_heads"],
        "patch_size": config["patch_size"], "img_size": config["img_size"],
    }  # fmt: skip


def distill(
    recipe: DistillRecipe,
    data: str | Path,
    output_dir: str | Path,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
    checkpoints: str | Path | None = None,
) -> RunResult:
    """Distil the recipe's teacher into its students (or resume), until the last iteration or
    ``max_iterations`` more. ``checkpoints``: a folder outside the output where the run keeps its state, keyed
    by the recipe, the data and the teacher's files (``state_folder``); default: ``output_dir/checkpoints``."""
    output_dir = Path(output_dir)
    distillation = recipe.distillation
    spec = inspect_teacher(distillation.teacher, distillation.teacher_weights)
    check_token_grids(recipe, spec)
    # after the checks: the key reads the teacher's files whole
    state = (
        None if checkpoints is None
        else state_folder(Path(checkpoints), recipe, data, [distillation.teacher, distillation.teacher_weights])
    )  # fmt: skip
    if not spec.has_heads:
        if distillation.head_fitting.iterations == 0:
            raise TeacherError(
                f"teacher {spec.source} has no DINO/iBOT heads and distillation.head_fitting.iterations is 0: "
                "give a teacher exported with heads (a pretraining run's teacher/ folder) or enable head fitting"
            )
        tracking = Tracking(
            stage="distill", run_name=run_name(recipe, output_dir, "head fitting"), tags=spec.identity()
        )
        fitting = fit_heads(
            lambda: head_fitting_recipe(recipe, distillation.head_fitting, teacher_as_student(spec)),
            lambda: load_teacher(spec)["backbone"], data, output_dir, tracking, max_iterations,
            checkpoints=None if state is None else state / HEAD_FITTING_FOLDER,
        )  # fmt: skip
        if fitting.stops_the_call:
            return fitting.run
        max_iterations = fitting.left
        # the original backbone file stays the teacher's identity; the fitted heads join it
        spec.heads_file, spec.heads = fitting.heads_file, read_heads(fitting.heads_file)
    teacher = load_teacher(spec)
    tracking = Tracking(
        stage="distill", run_name=run_name(recipe, output_dir), tags=spec.identity(),
        params={"distill.teacher_architecture": spec.config},
    )  # fmt: skip
    return run_training(
        lambda: DistillMetaArch(recipe, teacher), recipe, data, output_dir, tracking, max_iterations=max_iterations,
        knn_data=knn_data, collate=no_mask_collate(recipe), checkpoints=state,
    )  # fmt: skip


def no_mask_collate(recipe: Recipe):
    """Students see every patch: batches without iBOT masks."""
    from functools import partial

    from dinov2.data.collate import collate_data_and_cast

    grid = recipe.crops.global_crops_size // recipe.student.patch_size
    return partial(collate_data_and_cast, mask_probability=0.0, n_tokens=grid * grid)
