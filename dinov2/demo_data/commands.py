"""``dinov2 prepare-default``: the pipeline's default data, cut from Fashion-MNIST or an image folder."""

from pathlib import Path

import typer

from dinov2.options import PARAMS


def register(app: typer.Typer) -> None:
    @app.command("prepare-default")
    def prepare_default(
        out: Path = typer.Option(..., help="Output folder: seed/, pool/, eval/, manifests/, ground_truth.parquet."),
        params: Path | None = PARAMS,
    ) -> None:
        """Cut the default data from Fashion-MNIST: seed, pool with planted copies and distractors, eval splits."""
        from dinov2.configuration.params import load_section
        from dinov2.demo_data.build import build_default_data
        from dinov2.tracking import log_stage

        config = load_section(params, "prepare")
        metrics = build_default_data(out, config.default_data)
        log_stage("prepare", {**config.model_dump(), "out": str(out)}, metrics, out)
        typer.echo(f"{metrics['prepare/pool_images']} pool images, ground truth in {out / 'ground_truth.parquet'}")
