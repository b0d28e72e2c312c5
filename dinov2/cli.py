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


@app.command()
def export(
    model: str = typer.Option(..., help="torch.hub name of the backbone, e.g. dinov2_vits14."),
    weights: str = typer.Option(..., help="Checkpoint: path, file:// or http(s):// URL, or LVD142M."),
    out: Path = typer.Option(..., help="Output .safetensors file."),
    layout: str = typer.Option("hub", help="Key layout: 'hub' (released DINOv2) or 'timm'."),
) -> None:
    """Load a backbone checkpoint strictly and write it as safetensors in the hub or timm layout."""
    from dinov2.hub import create, save_backbone, save_timm

    if layout not in ("hub", "timm"):
        raise typer.BadParameter(f"unknown layout {layout!r}; expected 'hub' or 'timm'", param_hint="--layout")
    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"{out} should end in .safetensors", param_hint="--out")
    backbone = create(model, pretrained=True, weights=weights)
    (save_backbone if layout == "hub" else save_timm)(backbone, out)
    console.print(f"wrote {out} ({layout} layout)")


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
