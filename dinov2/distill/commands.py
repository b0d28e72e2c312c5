"""`dinov2 distill`: the training engine with the distillation objective, for every launcher."""

import json
from pathlib import Path

import typer

from dinov2.options import CHECKPOINTS, OVERRIDES, PARAMS, RECIPE


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        recipe: str | None = RECIPE,
        params: Path | None = PARAMS,
        teacher: str | None = typer.Option(
            None, help="Teacher: a run's teacher/ folder, a .safetensors backbone, a hub name or a .pth path/URL."
        ),
        teacher_weights: str | None = typer.Option(None, help="For a hub-name teacher: checkpoint path/URL."),
        data: Path | None = typer.Option(None, help="Image folder or Parquet manifest to distil on."),
        output: Path = typer.Option(Path("runs/distill"), help="Run folder: checkpoints, students, metrics."),
        override: list[str] = OVERRIDES,
        checkpoints: Path | None = CHECKPOINTS,
        max_iterations: int | None = typer.Option(None, help="Stop this call after N iterations (resume later)."),
        knn_data: Path | None = typer.Option(None, help="ImageFolder root with train/ and test/ for kNN."),
        dry_run: bool = typer.Option(False, help="Size teacher + students (params, FLOPs, memory per GPU)."),
        as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as one JSON object."),
    ) -> None:
        """Distil a frozen teacher (with its DINO/iBOT heads, fitted first if it has none) into smaller ViTs."""
        from dinov2.configuration.params import training_recipe
        from dinov2.train.commands import finish_training, print_dry_run

        overrides = list(override)
        if teacher is not None:
            overrides.append(f"distillation.teacher={json.dumps(teacher)}")
        if teacher_weights is not None:
            overrides.append(f"distillation.teacher_weights={json.dumps(teacher_weights)}")
        resolved = training_recipe(params, "distill", recipe, overrides)
        if dry_run:
            from dinov2.distill.dry_run import distill_dry_run_report

            report = distill_dry_run_report(resolved)
            students = ", ".join(f"{name} {s['parameters']:,}" for name, s in report["students"].items())
            headline = (
                f"recipe [bold]{report['recipe']}[/]: teacher {report['teacher']} {report['teacher_parameters']:,} "
                f"parameters (heads {report['teacher_heads']}); students {students}"
            )
            print_dry_run(report, headline, as_json)
            return
        if data is None:
            raise typer.BadParameter("--data is required to distil", param_hint="--data")
        from dinov2.distill.run import distill as run_distill

        finish_training(
            lambda: run_distill(
                resolved, data, output, max_iterations=max_iterations, knn_data=knn_data, checkpoints=checkpoints
            )
        )
