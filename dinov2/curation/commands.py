"""The curation stage commands: ``dinov2 prepare``, ``embed``, ``dedup`` and ``retrieve``, and ``dinov2
train-descriptor``, which trains the copy-detection descriptor ``embed`` can use.

Each reads its section of params.yaml (validated before any work), takes explicit input and output
paths so DVC and Prefect can wire it, writes metrics and plots into its output folder and logs them
to MLflow in the experiment ``dinov2/<stage>``.
"""

from pathlib import Path

import typer

from dinov2.configuration.params import load_section
from dinov2.options import PARAMS
from dinov2.tracking import log_stage, tracked_run

# Training losses go to MLflow every this many steps (and at the last step).
LOG_EVERY_STEPS = 10


def register(app: typer.Typer) -> None:
    @app.command()
    def prepare(
        images: Path = typer.Option(..., help="Folder of images (searched recursively)."),
        source: str = typer.Option(..., help="Name of this image source, e.g. cifar10_train."),
        split: str = typer.Option(..., help="pool (uncurated), seed (curated) or eval (to keep out)."),
        out: Path = typer.Option(..., help="Output folder: manifest.parquet, unreadable.parquet, metrics.json."),
        params: Path | None = PARAMS,
    ) -> None:
        """Build the Parquet manifest of an image folder (unreadable files recorded, exact copies collapsed)."""
        from dinov2.curation.manifest import prepare as prepare_manifest

        config = load_section(params, "prepare")
        metrics = prepare_manifest(images, source, split, out, config)
        inputs = {"images": str(images), "source": source, "split": split}
        log_stage("prepare", {**config.model_dump(), **inputs}, metrics, out)
        typer.echo(f"{metrics['prepare/images']} images in {out / 'manifest.parquet'}")

    @app.command()
    def embed(
        manifest: Path = typer.Option(..., help="manifest.parquet written by `dinov2 prepare`."),
        out: Path = typer.Option(..., help="Embedding folder (resumable: finished shards are kept)."),
        params: Path | None = PARAMS,
        section: str = typer.Option(
            "embed", help="embed (the copy detector dedup reads) or retrieve.embedder (the embedder retrieve reads)."
        ),
    ) -> None:
        """Embed a manifest into L2-normalised fp16 shards (under torchrun: shards split over ranks)."""
        from dinov2.curation.embed import embed as run_embed

        if section == "embed":
            config = load_section(params, "embed")
        elif section == "retrieve.embedder":
            config = load_section(params, "retrieve").embedder
        else:
            raise ValueError(f"--section {section}: expected embed or retrieve.embedder")
        metrics = run_embed(manifest, out, config)
        if "embed/embedded" in metrics:
            log_stage("embed", {**config.model_dump(), "manifest": str(manifest), "section": section}, metrics, out)
            typer.echo(f"{metrics['embed/embedded']} embeddings in {out}")

    @app.command()
    def dedup(
        pool: Path = typer.Option(..., help="Embedding folder of the uncurated pool."),
        eval_embeddings: list[Path] = typer.Option([], "--eval", help="Embedding folder of an evaluation split."),
        out: Path = typer.Option(..., help="Output folder: kept.parquet, duplicate_groups.parquet, plots/."),
        params: Path | None = PARAMS,
    ) -> None:
        """Self-dedup the pool and drop every image near-duplicated with an evaluation image."""
        from dinov2.curation.dedup import dedup as run_dedup

        config = load_section(params, "dedup")
        metrics = run_dedup(pool, eval_embeddings, out, config)
        log_stage("dedup", {**config.model_dump(), "pool": str(pool)}, metrics, out)
        typer.echo(f"kept {metrics['dedup/kept']} of {metrics['dedup/pool_images']} pool images")

    @app.command()
    def retrieve(
        pool: Path = typer.Option(..., help="Embedding folder of the pool."),
        kept: Path = typer.Option(..., help="kept.parquet written by `dinov2 dedup`."),
        seed: list[Path] = typer.Option([], help="Embedding folder of a curated seed set (repeatable)."),
        out: Path = typer.Option(..., help="Output folder: curated.parquet, plots/, metrics.json."),
        params: Path | None = PARAMS,
    ) -> None:
        """Retrieve the pool images that resemble each seed set: the curated pretraining manifest."""
        from dinov2.curation.retrieval import retrieve as run_retrieve

        config = load_section(params, "retrieve")
        if not seed and config.balanced is None:
            raise ValueError("give at least one --seed embedding folder, or configure retrieve.balanced")
        metrics = run_retrieve(pool, kept, seed, out, config)
        log_stage("retrieve", {**config.model_dump(), "pool": str(pool)}, metrics, out)
        typer.echo(f"{metrics['retrieve/curated']} curated images in {out / 'curated.parquet'}")

    @app.command("train-descriptor")
    def train_descriptor(
        manifest: Path = typer.Option(..., help="Pool manifest.parquet written by `dinov2 prepare`."),
        out: Path = typer.Option(..., help="Descriptor folder: descriptor.safetensors, descriptor.json, plots/."),
        params: Path | None = PARAMS,
    ) -> None:
        """Train an SSCD-style copy descriptor on a pool (no labels needed) and calibrate its dedup thresholds;
        embed with it through `embed.model: descriptor:OUT`."""
        from dinov2.copydetect.stage import check_inputs
        from dinov2.copydetect.stage import train_descriptor as train
        from dinov2.curation.manifest import read_manifest

        config = load_section(params, "descriptor")
        paths = read_manifest(manifest).column("path").to_pylist()
        check_inputs(paths, str(manifest), config)
        with tracked_run("train-descriptor", config={**config.model_dump(), "manifest": str(manifest)}) as tracker:

            def log_step(step: int, total: int, losses: dict[str, float]) -> None:
                if step % LOG_EVERY_STEPS == 0 or step == total - 1:
                    tracker.log_metrics({f"descriptor/{key}": value for key, value in losses.items()}, step=step)

            metrics = train(paths, str(manifest), out, config, on_step=log_step)
            tracker.log_metrics(metrics)
            tracker.log_artifact(out / "plots", "plots")
            tracker.log_artifact(out / "metrics.json")
            tracker.log_artifact(out / "descriptor.json")
        typer.echo(
            f"descriptor in {out}: self-dedup threshold {metrics['descriptor/self_threshold']:.4f} "
            f"(precision {metrics['descriptor/self_precision']:.3f}, recall {metrics['descriptor/self_recall']:.3f} "
            f"on held-out copies), relative {metrics['descriptor/relative_threshold']:.4f}"
        )
