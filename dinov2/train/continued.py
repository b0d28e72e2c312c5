"""Continued pretraining: pretraining that starts from a trained backbone (``init.source``) instead of random
weights.

The student's backbone (and so the teacher's: the teacher is the student's EMA and starts equal) is the
source's. Its DINO/iBOT heads come with the source when it has them (a pretraining run's ``teacher/`` folder);
a released backbone has none, and random heads against a trained backbone send large, arbitrary gradients
into it for the first iterations. So the heads are fitted first, with the backbone frozen
(``head_fitting.py``, the machinery distillation uses for a headless teacher), in a run of its own in
``OUT/head_fitting/``; then everything trains with the recipe. A killed run resumes in the phase it was in.
``init.head_fitting.iterations: 0`` starts from random heads instead.
"""

import logging
from pathlib import Path

import torch

from dinov2.configuration.recipes import Recipe
from dinov2.hub.checkpoints import describe, load_state_dict_strict, state_dict_problems
from dinov2.models import DinoVisionTransformer
from dinov2.train.head_fitting import HEAD_FITTING_FOLDER, fit_heads, head_fitting_recipe
from dinov2.train.sources import BackboneSource, SourceError, inspect_source, load_source, read_heads
from dinov2.train.ssl_meta_arch import SSLMetaArch, build_backbone, build_heads
from dinov2.train.train import RunResult, Tracking, run_name, run_training

logger = logging.getLogger(__name__)

ROLE = "init.source"


def inspect_init(recipe: Recipe) -> BackboneSource:
    """The recipe's ``init.source``, from headers and shapes only (nothing is loaded), checked to be the
    recipe's student backbone and, when it brings heads, the recipe's heads: else a one-line ``SourceError``
    naming the source and the first differences."""
    init = recipe.init
    spec = inspect_source(init.source, init.weights, role=ROLE)
    with torch.device("meta"):
        student = build_backbone(recipe, 0.0)
        given = DinoVisionTransformer(**spec.config)
        problems = state_dict_problems(student.state_dict(), given.state_dict())
        if problems:
            raise SourceError(f"{ROLE} {spec.source} is not the recipe's student ({describe(student)}): {problems}")
        if spec.has_heads:
            wanted = build_heads(recipe, student.embed_dim)
            given_heads = {name: shape.build() for name, shape in spec.heads.items()}
            names = sorted(set(wanted) | set(given_heads))
            for name in names:
                if name not in wanted or name not in given_heads:
                    having = "has" if name in given_heads else "has no"
                    raise SourceError(
                        f"{ROLE} {spec.source} {having} {name} but the recipe's objective "
                        f"{'needs' if name in wanted else 'has none'} (ibot.separate_head is "
                        f"{recipe.ibot.separate_head})"
                    )
                problems = state_dict_problems(wanted[name].state_dict(), given_heads[name].state_dict())
                if problems:
                    raise SourceError(f"{ROLE} {spec.source}: its {name} is not the recipe's ({problems})")
    return spec


def load_init_backbone(recipe: Recipe, spec: BackboneSource) -> DinoVisionTransformer:
    """The recipe's student architecture (without stochastic depth) with the source's weights: the backbone
    head fitting freezes. (The recipe, not the file, says how many attention heads the weights are cut into.)"""
    backbone = build_backbone(recipe, 0.0)
    load_state_dict_strict(backbone, load_source(spec)["backbone"].state_dict(), spec.source)
    return backbone


def continue_pretraining(
    recipe: Recipe,
    data: str | Path,
    output_dir: str | Path,
    max_iterations: int | None = None,
    knn_data: str | Path | None = None,
    checkpoints: Path | None = None,
) -> RunResult:
    """Pretraining from ``recipe.init`` (or its resumption): head fitting first when the source has no heads,
    then the recipe's run, until its last iteration or ``max_iterations`` more iterations in this call (head
    fitting included). ``checkpoints``: the run's state folder (head fitting's in its ``head_fitting/``)."""
    output_dir = Path(output_dir)
    init = recipe.init
    spec = inspect_init(recipe)
    heads = "loaded" if spec.has_heads else "fitted" if init.head_fitting.iterations else "random"
    identity = spec.identity("dinov2.init")
    fitted_iterations = 0
    if heads == "fitted":
        tracking = Tracking(stage="pretrain", run_name=run_name(recipe, output_dir, "head fitting"), tags=identity)
        fitting = fit_heads(
            lambda: head_fitting_recipe(recipe, init.head_fitting, recipe.student.model_dump(mode="json")),
            lambda: load_init_backbone(recipe, spec), data, output_dir, tracking, max_iterations,
            checkpoints=None if checkpoints is None else checkpoints / HEAD_FITTING_FOLDER,
        )  # fmt: skip
        if fitting.stops_the_call:
            logger.info("head fitting stopped at iteration %d; start the run again to go on", fitting.run.iteration)
            return fitting.run
        max_iterations = fitting.left
        spec.heads_file, spec.heads = fitting.heads_file, read_heads(fitting.heads_file)
        fitted_iterations = init.head_fitting.iterations
    elif heads == "random":
        logger.warning("%s %s has no heads and init.head_fitting.iterations is 0: the heads start random", ROLE,
                       spec.source)  # fmt: skip
    tracking = Tracking(
        stage="pretrain", run_name=run_name(recipe, output_dir),
        tags={**identity, "dinov2.init_heads": heads}, params={"init.heads": heads},
        summary={"init/heads_fitted": float(heads == "fitted"), "init/head_fitting_iterations": fitted_iterations},
    )  # fmt: skip
    return run_training(
        lambda: SSLMetaArch(recipe, initial=load_source(spec), initial_source=spec.source), recipe, data, output_dir,
        tracking, max_iterations=max_iterations, knn_data=knn_data, checkpoints=checkpoints,
    )  # fmt: skip
