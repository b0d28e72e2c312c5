"""The ``pretrain`` flow: size a recipe with the engine's dry run, then launch ``dinov2 pretrain`` where the
deployment says (this machine, DeepSpeed's launcher, Slurm, Kubernetes), wait for it and report.

With ``dry_run`` it stops after the plan: parameters, FLOPs, memory per GPU per ZeRO stage, the DeepSpeed
configuration and the exact launch command (with the rendered sbatch script or PyTorchJob), published as
an artifact. It needs neither data nor GPUs, so it completes anywhere.
"""

import json
import shlex
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from dinov2.tracking import tracking_uri
from flows.launchers import (
    REPOSITORY,
    ClusterSettings,
    Launcher,
    LaunchPlan,
    job_name,
    launch_plan,
    pretrain_arguments,
    run_pytorchjob,
    run_slurm_job,
)
from flows.services import check_tracking_server
from flows.stages import (
    DINOV2,
    artifact_key,
    named_run,
    publish_results,
    retry_if_transient,
    run_command,
    run_json_command,
)


@task(task_run_name="dry-run-{arguments[2]}", cache_policy=NO_CACHE)
def size_run(arguments: list[str]) -> dict[str, Any]:
    """The engine's dry run of these arguments: validates recipe and overrides, sizes the model (exit 2
    with the engine's one-line message for an unknown recipe or key)."""
    return run_json_command("pretrain dry run", [*DINOV2, *arguments, "--dry-run", "--json"])


def plan_markdown(plan: dict[str, Any], launch: LaunchPlan, nodes: int, gpus_per_node: int) -> str:
    world_size = nodes * gpus_per_node
    lines = [f"# Pretraining plan: {plan.get('recipe', '?')}", ""]
    lines += [f"Launcher **{launch.launcher}**: {nodes} node(s) x {gpus_per_node} GPU(s) = {world_size} rank(s).", ""]
    lines += ["| quantity | value |", "|---|---|"]
    for key, value in plan.items():
        if not isinstance(value, dict | list):
            lines.append(f"| {key.replace('_', ' ')} | {f'{value:,}' if isinstance(value, int) else value} |")
        elif key != "memory_per_gpu" and key != "deepspeed_config":
            lines.append(f"| {key.replace('_', ' ')} | `{json.dumps(value)}` |")
    memory = plan.get("memory_per_gpu", {})
    if memory:
        stages = sorted(key for key in next(iter(memory.values())) if key.startswith("zero"))
        lines += ["", "## Memory per GPU (GiB)", ""]
        headers = [stage.replace("zero", "ZeRO-").removesuffix("_gib") for stage in stages]
        lines += ["| GPUs | images per GPU | " + " | ".join(headers) + " |", "|---" * (len(stages) + 2) + "|"]
        for gpus, row in memory.items():
            mark = " (this launch)" if int(gpus) == world_size else ""
            cells = " | ".join(f"{row[stage]:,}" for stage in stages)
            lines.append(f"| {gpus}{mark} | {row.get('images_per_gpu', '')} | {cells} |")
    if "deepspeed_config" in plan:
        configuration = json.dumps(plan["deepspeed_config"], indent=2)
        lines += ["", "## DeepSpeed configuration", "", "```json", configuration, "```"]
    lines += ["", "## Launch", "", "```bash", shlex.join(launch.command), "```"]
    for warning in launch.warnings:
        lines += ["", f"> **Warning:** {warning}"]
    for name, text in launch.files.items():
        lines += ["", f"`{name}`:", "", "```", text.rstrip(), "```"]
    return "\n".join(lines)


def check_world_size(plan: dict[str, Any], nodes: int, gpus_per_node: int) -> None:
    batch = plan.get("deepspeed_config", {}).get("train_batch_size")
    world_size = nodes * gpus_per_node
    if batch and batch % world_size:
        raise ValueError(
            f"train.batch_size {batch} is not divisible by {nodes} node(s) x {gpus_per_node} GPU(s) = {world_size}"
        )


@task(retries=2, retry_delay_seconds=30, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def launch_run(launch: LaunchPlan, cluster: ClusterSettings) -> None:
    """Run the launch and wait for it; a retry launches the same command again, which resumes from the
    newest checkpoint in the output folder."""
    logger = get_run_logger()
    folder = REPOSITORY / "runs" / "launch" / (launch.job_name or "local")
    if launch.launcher == "slurm":
        run_slurm_job(launch, folder, cluster, logger)
    elif launch.launcher == "kubernetes":
        run_pytorchjob(launch, folder, cluster, logger)
    else:
        run_command("pretrain", launch.command, cwd=REPOSITORY)


@flow(name="pretrain", flow_run_name=named_run("recipe", "params.yaml", "output", "runs/pretrain"))
def pretrain(
    recipe: str | None = None,
    data: str | None = None,
    output: str = "runs/pretrain",
    overrides: list[str] | None = None,
    dry_run: bool = False,
    launcher: Launcher = "local",
    nodes: int = 1,
    gpus_per_node: int = 1,
    cluster: ClusterSettings | None = None,
    retries: int = 2,
    retry_delay_seconds: float = 30,
) -> dict[str, Any]:
    """DINOv2 pretraining of ``recipe`` (default: params.yaml's) on ``data`` into ``output`` (resumes from its
    checkpoints).

    ``overrides`` are recipe overrides (``optim.epochs=20``); ``launcher`` and ``nodes`` x
    ``gpus_per_node`` say where it runs, ``cluster`` the scheduler settings; ``retries`` how often a
    transient failure is launched again, ``retry_delay_seconds`` later."""
    cluster = cluster or ClusterSettings()
    if not dry_run and not data:
        raise ValueError("data is required to train: an image folder or a Parquet manifest (or set dry_run)")
    check_tracking_server()
    arguments = pretrain_arguments(recipe, data, output, overrides or [])
    plan = size_run(arguments)
    check_world_size(plan, nodes, gpus_per_node)
    environment = {"MLFLOW_TRACKING_URI": tracking_uri(), "PREFECT__FLOW_RUN_ID": flow_run.id or ""}
    launch = launch_plan(
        launcher, arguments, nodes=nodes, gpus_per_node=gpus_per_node, cluster=cluster,
        name=job_name(recipe, flow_run.id), environment=environment,
    )  # fmt: skip
    for warning in launch.warnings:
        get_run_logger().warning(warning)
    if dry_run:
        create_markdown_artifact(
            plan_markdown(plan, launch, nodes, gpus_per_node),
            key=artifact_key("pretrain", "plan", recipe or "params"),
            description=f"pretraining plan for {recipe} on {launcher}",
        )
        return plan
    launch_run.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)(launch, cluster)
    # a PyTorchJob writes into its volume, which the worker's machine does not see
    metrics_files = [] if launcher == "kubernetes" else [str(Path(output) / "metrics.json")]
    published = publish_results("pretrain", "dinov2/pretrain", metrics_files, f"recipe `{recipe}`, output `{output}`")
    return next(iter(published.values()), {})
