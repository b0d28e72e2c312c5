"""The curation stage commands: ``dinov2 prepare`` (and ``prepare-default``), ``embed``, ``dedup`` and ``retrieve``,
and ``dinov2 train-descriptor``, which trains the copy-detection descriptor ``embed`` can use.

Each reads its section of params.yaml (validated before any work), takes explicit input and output
paths so DVC and Prefect can wire it, writes metrics and plots into its output folder and logs them
to MLflow in the experiment ``dinov2/<stage>``.
"""

from pathlib import Path

import typer

from dinov2.configuration import load_section
from dinov2.curation.params import DedupParams, DescriptorParams, EmbedParams, PrepareParams, RetrieveParams
from dinov2.tracking import tracked_run

DEFAULT_PARAMS = Path("params.yaml")
# Training losses go to MLflow every this many steps (and at the last step).
LOG_EVERY_STEPS = 10
PARAMS = typer.Option(
    None, help="Params file holding this stage's section (default: ./params.yaml if there is one, else defaults)."
)


def _section(path: Path | None, name: str, schema):
    """The validated section; a file the user named must exist, the implicit ./params.yaml may not."""
    if path is None:
        if not DEFAULT_PARAMS.is_file():
            return schema()
        path = DEFAULT_PARAMS
    return load_section(path, name, schema)


def _log(stage: str, config: dict, metrics: dict, out: Path) -> None:
    with tracked_run(stage, config=config) as tracker:
        tracker.log_metrics({key: value for key, value in metrics.items() if isinstance(value, int | float)})
        plots = out / "plots"
        if plots.is_dir() and any(plots.iterdir()):
            tracker.log_artifact(plots, "plots")
        tracker.log_artifact(out / "metrics.json")


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
        from dinov2.curation import stages

        config = _section(params, "prepare", PrepareParams)
        metrics = stages.prepare(images, source, split, out, config)
        _log("prepare", {**config.model_dump(), "images": str(images), "source": source, "split": split}, metrics, out)
        typer.echo(f"{metrics['prepare/images']} images in {out / 'manifest.parquet'}")

    @app.command("prepare-default")
    def prepare_default(
        out: Path = typer.Option(..., help="Output folder: seed/, pool/, eval/, manifests/, ground_truth.parquet."),
        params: Path | None = PARAMS,
    ) -> None:
        """Cut the default data from Fashion-MNIST: seed, pool with planted copies and distractors, eval splits."""
        from dinov2.curation.default_data import build_default_data

        config = _section(params, "prepare", PrepareParams)
        metrics = build_default_data(out, config.default_data)
        _log("prepare", {**config.model_dump(), "out": str(out)}, metrics, out)
        typer.echo(f"{metrics['prepare/pool_images']} pool images, ground truth in {out / 'ground_truth.parquet'}")

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
        from dinov2.curation import stages

        if section == "embed":
            config = _section(params, "embed", EmbedParams)
        elif section == "retrieve.embedder":
            config = _section(params, "retrieve", RetrieveParams).embedder
        else:
            raise ValueError(f"--section {section}: expected embed or retrieve.embedder")
        metrics = stages.embed(manifest, out, config)
        if "embed/embedded" in metrics:
            _log("embed", {**config.model_dump(), "manifest": str(manifest), "section": section}, metrics, out)
            typer.echo(f"{metrics['embed/embedded']} embeddings in {out}")

    @app.command()
    def dedup(
        pool: Path = typer.Option(..., help="Embedding folder of the uncurated pool."),
        eval_embeddings: list[Path] = typer.Option([], "--eval", help="Embedding folder of an evaluation split."),
        out: Path = typer.Option(..., help="Output folder: kept.parquet, duplicate_groups.parquet, plots/."),
        params: Path | None = PARAMS,
    ) -> None:
        """Self-dedup the pool and drop every image near-duplicated with an evaluation image."""
        from dinov2.curation import stages

        config = _section(params, "dedup", DedupParams)
        metrics = stages.dedup(pool, eval_embeddings, out, config)
        _log("dedup", {**config.model_dump(), "pool": str(pool)}, metrics, out)
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
        from dinov2.curation import stages

        config = _section(params, "retrieve", RetrieveParams)
        if not seed and config.balanced is None:
            raise ValueError("give at least one --seed embedding folder, or configure retrieve.balanced")
        metrics = stages.retrieve(pool, kept, seed, out, config)
        _log("retrieve", {**config.model_dump(), "pool": str(pool)}, metrics, out)
        typer.echo(f"{metrics['retrieve/curated']} curated images in {out / 'curated.parquet'}")

    @app.command("train-descriptor")
    def train_descriptor(
        manifest: Path = typer.Option(..., help="Pool manifest.parquet written by `dinov2 prepare`."),
        out: Path = typer.Option(..., help="Descriptor folder: descriptor.safetensors, descriptor.json, plots/."),
        params: Path | None = PARAMS,
    ) -> None:
        """Train an SSCD-style copy descriptor on a pool (no labels needed) and calibrate its dedup thresholds;
        embed with it through `embed.model: descriptor:OUT`."""
        from dinov2.curation.trained_descriptor.stage import check_inputs
        from dinov2.curation.trained_descriptor.stage import train_descriptor as train

        config = _section(params, "descriptor", DescriptorParams)
        check_inputs(manifest, config)
        with tracked_run("train-descriptor", config={**config.model_dump(), "manifest": str(manifest)}) as tracker:

            def log_step(step: int, total: int, losses: dict[str, float]) -> None:
                if step % LOG_EVERY_STEPS == 0 or step == total - 1:
                    tracker.log_metrics({f"descriptor/{key}": value for key, value in losses.items()}, step=step)

            metrics = train(manifest, out, config, on_step=log_step)
            tracker.log_metrics(metrics)
            tracker.log_artifact(out / "plots", "plots")
            tracker.log_artifact(out / "metrics.json")
            tracker.log_artifact(out / "descriptor.json")
        typer.echo(
            f"descriptor in {out}: self-dedup threshold {metrics['descriptor/self_threshold']:.4f} "
            f"(precision {metrics['descriptor/self_precision']:.3f}, recall {metrics['descriptor/self_recall']:.3f} "
            f"on held-out copies), relative {metrics['descriptor/relative_threshold']:.4f}"
        )
