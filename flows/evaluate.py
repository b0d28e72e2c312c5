"""The ``evaluate`` flow: ``dinov2 evaluate`` on a frozen backbone, then its metrics and MLflow run as an artifact."""

from prefect import flow

from flows.services import check_tracking_server
from flows.stages import DINOV2, named_run, publish_results, run_stage


def evaluate_command(backbone: str, weights: str | None, params: str, out: str, metrics: str) -> list[str]:
    command = [*DINOV2, "evaluate", "--backbone", backbone, "--params", params, "--out", out, "--metrics", metrics]
    return command + (["--weights", weights] if weights else [])


@flow(
    name="evaluate",
    flow_run_name=named_run("backbone", "outputs/pretrain/teacher/backbone.safetensors", "out", "runs/evaluate"),
)
def evaluate(
    backbone: str = "outputs/pretrain/teacher/backbone.safetensors",
    weights: str | None = None,
    params: str = "params.yaml",
    out: str = "runs/evaluate",
    metrics: str = "runs/evaluate.json",
    retries: int = 1,
) -> dict:
    """kNN, linear, logistic-regression, retrieval and dense evaluations of ``backbone`` (a .safetensors
    export or a torch.hub name), as configured in the ``evaluate`` section of ``params``."""
    check_tracking_server()
    run_stage.with_options(retries=retries)("evaluate", evaluate_command(backbone, weights, params, out, metrics))
    published = publish_results(
        "evaluate", "dinov2/evaluate", [metrics], notes=f"backbone `{backbone}`, report `{out}`"
    )
    return next(iter(published.values()), {})
