"""The ``dinov2 evaluate`` stage command."""

import json
import logging
from pathlib import Path

import typer

from dinov2.options import PARAMS

logger = logging.getLogger(__name__)


def evaluate(
    backbone: str = typer.Option(
        ..., help="torch.hub name (e.g. dinov2_vits14), a .safetensors file from `dinov2 export`, or raw_pixels."
    ),
    weights: str | None = typer.Option(None, help="Checkpoint for a hub name; random init when omitted."),
    params: Path | None = PARAMS,
    out: Path = typer.Option(Path("runs/evaluate"), help="Report folder (replaced when the run completes)."),
    metrics: Path = typer.Option(Path("runs/evaluate.json"), help="Metrics file (DVC metrics in the pipeline)."),
    register_as: str | None = typer.Option(
        None,
        help="Register the backbone in the MLflow model registry under this name (alias candidate; "
        "champion when it beats the current champion on evaluate.champion_metric); 'none' skips.",
    ),
) -> None:
    """Evaluate a frozen backbone: kNN, linear probe, logistic regression, retrieval, dense heads (see params)."""
    from dinov2.atomic import output_folder
    from dinov2.configuration.params import load_section
    from dinov2.eval.report import mlflow_metrics, write_metrics_json, write_report
    from dinov2.eval.suite import check_inputs, load_evaluated_backbone, run_suite
    from dinov2.registry import register_backbone
    from dinov2.tracking import TRACKING_ENV, tracked_run, tracking_enabled

    settings = load_section(params, "evaluate")
    if register_as in (None, "none"):
        register_as = None
    elif not tracking_enabled():
        raise ValueError(f"--register-as {register_as}: the model registry is MLflow's, and {TRACKING_ENV}=off")
    elif not backbone.endswith(".safetensors"):
        raise ValueError(f"--register-as {register_as}: only a .safetensors backbone can be registered, not {backbone}")
    elif settings.champion_metric.split("_")[0] not in settings.evaluations:
        raise ValueError(
            f"evaluate.champion_metric {settings.champion_metric!r} needs the "
            f"{settings.champion_metric.split('_')[0]!r} evaluation, which evaluate.evaluations does not run"
        )
    evaluated = load_evaluated_backbone(backbone, weights)
    check_inputs(settings, evaluated)
    config = {"evaluate": json.loads(settings.model_dump_json()), "backbone": backbone, "weights": weights}
    with tracked_run("evaluate", config=config, run_name=f"{settings.dataset}/{Path(backbone).name}") as tracker:
        result = run_suite(settings, evaluated)
        with output_folder(out) as partial:
            write_report(result, backbone, partial)
        write_metrics_json(result, backbone, metrics)
        tracker.log_metrics(mlflow_metrics(result))
        tracker.log_dict(result.details, "evaluate/details.json")
        tracker.log_artifact(out, "evaluate")
        if register_as is not None:
            if settings.champion_metric not in result.metrics:
                raise ValueError(
                    f"evaluate.champion_metric {settings.champion_metric!r} was not computed; "
                    f"computed: {', '.join(sorted(result.metrics))}"
                )
            registered = register_backbone(
                tracker, backbone, register_as, settings.champion_metric, result.metrics[settings.champion_metric]
            )
            typer.echo(
                f"registered {registered['name']} version {registered['version']} as candidate"
                + (" and champion" if registered["champion"] else "")
            )
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"report in {out / 'report.md'}, metrics in {metrics}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
