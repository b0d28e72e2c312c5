"""The ``dinov2 report`` stage command."""

from pathlib import Path

import typer

from dinov2.options import PARAMS


def report(
    out: Path = typer.Option(Path("outputs/report"), help="Report folder (replaced when the page is complete)."),
    prepare: Path | None = typer.Option(None, help="Folder of `dinov2 prepare-default` (ground truth, manifests)."),
    dedup: Path | None = typer.Option(None, help="Folder of `dinov2 dedup`."),
    retrieve: Path | None = typer.Option(None, help="Folder of `dinov2 retrieve`."),
    pretrain: Path | None = typer.Option(None, help="Run folder of `dinov2 pretrain`."),
    distill: Path | None = typer.Option(None, help="Run folder of `dinov2 distill`."),
    evaluation: list[str] | None = typer.Option(
        None,
        help="NAME=DIR or NAME=DIR:METRICS.json, once per model: a `dinov2 evaluate --out DIR` folder and the file "
        "its --metrics wrote (DIR/metrics.json when omitted). NAME labels the row, e.g. raw_pixels, teacher.",
    ),
    params: Path | None = PARAMS,
) -> None:
    """One page (Markdown + self-contained HTML) over every stage's outputs; missing inputs are named on it."""
    from dinov2.configuration.params import load_section
    from dinov2.report.inputs import EvaluationInput, ReportInputs
    from dinov2.report.page import write_report
    from dinov2.report.sections import build_page
    from dinov2.tracking import tracked_run

    settings = load_section(params, "report")
    inputs = ReportInputs(
        prepare, dedup, retrieve, pretrain, distill, [EvaluationInput.parse(text) for text in evaluation or []]
    )
    inputs.check()
    page, metrics = build_page(inputs, settings)
    config = {
        "report": settings.model_dump(),
        "inputs": {name: str(value) for name, value in vars(inputs).items() if isinstance(value, Path)},
        "evaluations": {e.name: f"{e.folder}:{e.metrics_file}" for e in inputs.evaluations},
    }
    write_report(page, metrics, out)
    with tracked_run("report", config=config, run_name="report") as tracker:
        tracker.log_metrics(metrics)
        tracker.log_artifact(out, "report")
    missing = inputs.not_given()
    typer.echo(f"{out / 'report.html'} and {out / 'report.md'}: {len(metrics)} headline numbers")
    if missing:
        typer.echo(f"not given: {', '.join(missing)}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
