"""The ``dinov2`` command: one sub-command per job."""

import json
import logging
import os
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="DINOv2: curate, pretrain, distill and evaluate self-supervised ViTs.", no_args_is_help=True)
console = Console()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
    local_rank: int | None = typer.Option(
        None, "--local_rank", hidden=True, help="Set by the deepspeed launcher before the sub-command."
    ),
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


@app.command()
def models() -> None:
    """List the torch.hub models with their parameter counts (built on the meta device: no memory used)."""
    from dinov2.hub import ENTRY_POINTS
    from dinov2.hub.export import count_parameters

    table = Table("name", "parameters", "embed_dim", "blocks", "registers")
    for name in sorted(ENTRY_POINTS):
        with torch.device("meta"):
            model = ENTRY_POINTS[name](pretrained=False)
        backbone = getattr(model, "backbone", model)
        table.add_row(
            name,
            f"{count_parameters(model):,}",
            str(backbone.embed_dim),
            str(backbone.n_blocks),
            str(backbone.num_register_tokens),
        )
    console.print(table)


EXPORT_ARTIFACT_MAX_BYTES = 50 * 1024 * 1024  # larger exports are logged to MLflow by path only


@app.command()
def export(
    out: Path = typer.Option(
        ..., help="Output: a .safetensors file (safetensors, timm), a .onnx file (onnx) or a folder (hf)."
    ),
    format_: str = typer.Option(
        "safetensors",
        "--format",
        help="safetensors: our layout with the architecture in the metadata (dinov2.hub.load_backbone reads it); "
        "timm: timm's ViT layout; onnx: ONNX with dynamic batch and image size, checked in ONNX Runtime; "
        "hf: a Hugging Face Transformers folder (Dinov2Model / Dinov2WithRegistersModel), checked in transformers.",
    ),
    model: str | None = typer.Option(None, help="torch.hub name of the backbone, e.g. dinov2_vits14 (with --weights)."),
    weights: str | None = typer.Option(
        None, help="Checkpoint for --model: path, file:// or http(s):// URL, or LVD142M."
    ),
    backbone: Path | None = typer.Option(
        None,
        help="Instead of --model: a backbone .safetensors (training, dinov2 export) or a Hugging Face DINOv2 folder.",
    ),
    dtype: str = typer.Option(
        "fp32", help="onnx only: fp32, or fp16 (checked against our fp32 forward, looser tolerance)."
    ),
    layout: str | None = typer.Option(
        None, hidden=True, help="Old name: --layout hub|timm is --format safetensors|timm."
    ),
) -> None:
    """Export a backbone as safetensors, timm, ONNX or a Hugging Face folder, check that the export gives our
    outputs (max abs difference per output), and log the export to MLflow. Fails (exit 2, export removed)
    when parity is worse than the format's tolerance."""
    from dinov2.hub import create, load_backbone
    from dinov2.hub.formats import check_architecture, check_destination, export_model, require_packages
    from dinov2.models import DinoVisionTransformer
    from dinov2.tracking import tracked_run

    if layout is not None:
        if layout not in ("hub", "timm"):
            raise ValueError(f"unknown layout {layout!r}; expected 'hub' or 'timm' (or use --format)")
        format_ = "safetensors" if layout == "hub" else "timm"
    check_destination(format_, out, dtype)
    require_packages(format_)
    if (model is None) == (backbone is None):
        raise ValueError("give the backbone as --model NAME --weights W, or as --backbone PATH (not both)")
    if model is not None:
        if weights is None:
            raise ValueError(f"--model {model} needs --weights (the checkpoint to export)")
        network = create(model, pretrained=True, weights=weights)
        if not isinstance(network, DinoVisionTransformer):
            raise ValueError(f"{model} is not a backbone (a classifier?); export a backbone such as dinov2_vits14")
        source = f"{model}:{weights}"
    else:
        if weights is not None:
            raise ValueError("--weights goes with --model; --backbone holds its own weights")
        if not backbone.exists():
            raise FileNotFoundError(f"backbone not found: {backbone}")
        network = load_backbone(backbone)
        source = str(backbone)
    check_architecture(format_, network)  # a refusal opens no MLflow run
    config = {"format": format_, "dtype": dtype, "source": source, "out": str(out.resolve())}
    with tracked_run("export", config=config, run_name=f"export {format_} {out.name}") as tracker:
        report = export_model(network, format_, out, dtype=dtype)
        tracker.log_metrics({f"export/parity_{key}": value for key, value in report.parity.items()})
        size = report.size_bytes()
        tracker.log_params({"export/path": str(out.resolve()), "export/bytes": size})
        if size <= EXPORT_ARTIFACT_MAX_BYTES:
            tracker.log_artifact(out, artifact_path=f"export/{out.name}" if out.is_dir() else "export")
    if report.parity:
        table = Table("output", "max abs difference", "tolerance", title=f"parity of {out}")
        for key, value in report.parity.items():
            held = key in report.held
            table.add_row(key, f"{value:.3g}", f"{report.tolerance:g}" if held else "reported, not held")
        console.print(table)
    for note in report.notes:
        console.print(note, highlight=False, soft_wrap=True)
    console.print(f"wrote {out} ({format_})", highlight=False, soft_wrap=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("outputs/demo"), help="Output folder (replaced when the run completes)."),
    model: str = typer.Option("dinov2_vits14", help="torch.hub name of the backbone."),
    weights: str | None = typer.Option(None, help="Checkpoint path/URL; random init when omitted."),
    images: Path | None = typer.Option(None, help="Folder of images; scikit-image's bundled photos when omitted."),
    crop_size: int = typer.Option(224, help="Center-crop size in pixels (a multiple of the patch size)."),
) -> None:
    """Embed real photos with a backbone, export it, reload the export and check the features match."""
    from dinov2.demo import run_demo

    summary = run_demo(out, model_name=model, weights=weights, images=images, crop_size=crop_size)
    console.print_json(json.dumps(summary))
    console.print(f"outputs in {out}/")


# Errors a user can fix (bad path, bad checkpoint, bad option value): one line, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError)


def run() -> None:
    try:
        app()
    except USER_ERRORS as error:
        # Escaped: a message such as "params.yaml [dedup]: ..." is text, not rich markup to swallow.
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


from dinov2.configuration.commands import register as _register_configuration  # noqa: E402

_register_configuration(app)

from dinov2.demo_data.commands import register as _register_demo_data  # noqa: E402

_register_demo_data(app)

from dinov2.curation.commands import register as _register_curation  # noqa: E402

_register_curation(app)

from dinov2.train.commands import register as _register_train  # noqa: E402

_register_train(app)

from dinov2.eval.commands import register as _register_eval  # noqa: E402

_register_eval(app)

from dinov2.distill.commands import register as _register_distill  # noqa: E402

_register_distill(app)

from dinov2.report.commands import register as _register_report  # noqa: E402

_register_report(app)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pipeline(context: typer.Context) -> None:
    """Run the DVC pipeline (`dvc repro`, extra arguments passed on) under one parent MLflow run with a
    child run per stage."""
    from dinov2.pipeline import run_pipeline

    code = run_pipeline(list(context.args))
    if code:
        raise typer.Exit(code)
