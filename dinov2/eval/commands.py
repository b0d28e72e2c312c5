"""The ``dinov2 evaluate`` stage command."""

import json
import logging
import os
import shutil
from pathlib import Path

import typer

logger = logging.getLogger(__name__)


def evaluate(
    backbone: str = typer.Option(
        ..., help="torch.hub name (e.g. dinov2_vits14), a .safetensors file from `dinov2 export`, or raw_pixels."
    ),
    weights: str | None = typer.Option(None, help="Checkpoint for a hub name; random init when omitted."),
    params: Path = typer.Option(Path("params.yaml"), help="Params file; its `evaluate` section is read."),
    out: Path = typer.Option(Path("outputs/evaluate"), help="Report folder (replaced when the run completes)."),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="DVC metrics file."),
) -> None:
    """Evaluate a frozen backbone: kNN, linear probe, logistic regression, retrieval, dense heads (see params)."""
    from dinov2.configuration import load_section
    from dinov2.eval.params import EvaluateParams
    from dinov2.eval.report import mlflow_metrics, write_metrics_json, write_report
    from dinov2.eval.suite import check_inputs, load_evaluated_backbone, run_suite
    from dinov2.tracking import tracked_run

    settings = load_section(params, "evaluate", EvaluateParams)
    evaluated = load_evaluated_backbone(backbone, weights)
    check_inputs(settings, evaluated)
    config = {"evaluate": json.loads(settings.model_dump_json()), "backbone": backbone, "weights": weights}
    with tracked_run("evaluate", config=config, run_name=f"{settings.dataset}/{Path(backbone).name}") as tracker:
        result = run_suite(settings, evaluated)
        partial = out.with_name(f".{out.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_report(result, backbone, partial)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
        write_metrics_json(result, backbone, metrics)
        tracker.log_metrics(mlflow_metrics(result))
        tracker.log_dict(result.details, "evaluate/details.json")
        tracker.log_artifact(out, "evaluate")
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"report in {out / 'report.md'}, metrics in {metrics}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
