"""The ``distill`` flow: ``dinov2 distill`` from a pretrained teacher into smaller students, then report.

The distillation engine is the pretraining engine (same DeepSpeed loop, same resume from the newest
checkpoint in the output folder), so a retried run continues where it stopped.
"""

import json
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.launchers import recipe_arguments, training_arguments
from flows.services import check_tracking_server
from flows.stages import DINOV2, artifact_key, named_run, publish_results, run_json_command, run_stage


def distill_arguments(
    recipe: str | None, teacher: str, data: str | None, output: str, overrides: list[str]
) -> list[str]:
    return training_arguments(["distill", *recipe_arguments(recipe), "--teacher", teacher], data, output, overrides)


@task(task_run_name="dry-run-{arguments[2]}", cache_policy=NO_CACHE)
def size_distillation(arguments: list[str]) -> dict[str, Any]:
    return run_json_command("distill dry run", [*DINOV2, *arguments, "--dry-run", "--json"])


@flow(name="distill", flow_run_name=named_run("recipe", "params.yaml", "output", "runs/distill"))
def distill(
    recipe: str | None = None,
    teacher: str = "outputs/pretrain/teacher",
    data: str | None = None,
    output: str = "runs/distill",
    overrides: list[str] | None = None,
    dry_run: bool = False,
    retries: int = 2,
) -> dict[str, Any]:
    """Distil the frozen ``teacher`` (a pretraining run's teacher/ folder) into the students of ``recipe``
    (default: params.yaml's) on ``data``; the final students land in ``output``/students/<name>/backbone.safetensors."""
    if not dry_run and not data:
        raise ValueError("data is required to distill: an image folder or a Parquet manifest (or set dry_run)")
    check_tracking_server()
    arguments = distill_arguments(recipe, teacher, data, output, overrides or [])
    if dry_run:
        plan = size_distillation(arguments)
        create_markdown_artifact(
            "\n".join([f"# Distillation plan: {recipe}", "", "```json", json.dumps(plan, indent=2), "```"]),
            key=artifact_key("distill", "plan", recipe or "params"),
            description=f"distillation plan for {recipe}",
        )
        return plan
    run_stage.with_options(retries=retries)("distill", [*DINOV2, *arguments])
    published = publish_results(
        "distill", "dinov2/distill", [f"{output}/metrics.json"], notes=f"recipe `{recipe}`, teacher `{teacher}`"
    )
    return next(iter(published.values()), {})
