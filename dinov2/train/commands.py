"""`dinov2 pretrain`: one command for every launcher (none, torchrun, deepspeed)."""

import json
import os
import sys
from pathlib import Path

import typer

from dinov2.options import CHECKPOINTS, OVERRIDES, PARAMS, RECIPE


def register(app: typer.Typer) -> None:
    @app.command()
    def pretrain(
        recipe: str | None = RECIPE,
        params: Path | None = PARAMS,
        data: Path | None = typer.Option(None, help="Image folder or Parquet manifest to pretrain on."),
        output: Path = typer.Option(Path("runs/pretrain"), help="Run folder: checkpoints, exports, metrics."),
        override: list[str] = OVERRIDES,
        checkpoints: Path | None = CHECKPOINTS,
        init: str | None = typer.Option(
            None,
            "--init",
            help="Continue from a trained backbone: a run's teacher/ folder (heads included), a .safetensors backbone, "
            "a Hugging Face DINOv2 folder, a hub name (dinov2_vitb14) or a .pth path/URL; heads it lacks are fitted "
            "first (init.head_fitting).",
        ),  # fmt: skip
        init_weights: str | None = typer.Option(
            None, "--init-weights", help="For a hub-name --init: checkpoint path/URL (default: the released weights)."
        ),
        max_iterations: int | None = typer.Option(None, help="Stop this call after N iterations (resume later)."),
        knn_data: Path | None = typer.Option(None, help="ImageFolder root with train/ and test/ for teacher kNN."),
        dry_run: bool = typer.Option(False, help="Size the recipe (params, FLOPs, memory per GPU) without training."),
        as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as one JSON object."),
    ) -> None:
        """DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo) with DeepSpeed ZeRO, from scratch or from a
        trained backbone (--init); resumes from output/."""
        from dinov2.configuration.params import training_recipe
        from dinov2.train.pretrain import pretrain as run_pretrain

        overrides = list(override)
        if init is not None:
            overrides.append(f"init.source={json.dumps(init)}")
        if init_weights is not None:
            overrides.append(f"init.weights={json.dumps(init_weights)}")
        resolved = training_recipe(params, "pretrain", recipe, overrides)
        if dry_run:
            from dinov2.train.dry_run import dry_run_report

            report = dry_run_report(resolved)
            headline = (
                f"recipe [bold]{report['recipe']}[/]: student {report['student_parameters']:,} parameters "
                f"(backbone {report['backbone_parameters']:,}), teacher {report['teacher_parameters']:,}"
            )
            if "init" in report:
                headline += f"; starts from {report['init']['source']} (heads {report['init']['heads']})"
            print_dry_run(report, headline, as_json)
            return
        if data is None:
            raise typer.BadParameter("--data is required to train", param_hint="--data")
        finish_training(
            lambda: run_pretrain(
                resolved, data, output, max_iterations=max_iterations, knn_data=knn_data, checkpoints=checkpoints
            )
        )


def finish_training(train) -> None:
    """Run ``train()``, print its final metrics on rank 0 and leave: exit code 3 for a non-finite loss,
    4 for a collapsed objective (the stop the recipe asked for), 0 otherwise."""
    from dinov2.train.collapse import CollapseError
    from dinov2.train.train import NonFiniteLossError

    try:
        result = train()
    except (NonFiniteLossError, CollapseError) as error:
        print(f"error: {error}", file=sys.stderr)
        _exit_cleanly(code=3 if isinstance(error, NonFiniteLossError) else 4)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"iteration": result.iteration, **result.metrics}, indent=2, sort_keys=True))
    _exit_cleanly()


def print_dry_run(report: dict, headline: str, as_json: bool) -> None:
    """The plan as JSON, or as a headline, a memory table per GPU count and ZeRO stage, and the config."""
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{headline}; {report['training_gflops_per_image']:,} GFLOPs per image per step; "
        f"{report['total_training_flops']} FLOPs in all = {report['a100_hours_at_mfu']['hours']:,} A100-hours "
        f"at {report['a100_hours_at_mfu']['mfu']:.0%} MFU"
    )
    table = Table("GPUs", "images/GPU", "ZeRO-0 GiB", "ZeRO-1 GiB", "ZeRO-2 GiB", "ZeRO-3 GiB", title="memory per GPU")
    for gpus, row in report["memory_per_gpu"].items():
        table.add_row(str(gpus), str(row["images_per_gpu"]), *(f"{row[f'zero{s}_gib']:,}" for s in range(4)))
    console.print(table)
    console.print_json(json.dumps(report["deepspeed_config"]))


def _exit_cleanly(code: int = 0) -> None:
    """Tear the process group down and leave without running interpreter finalisers: with gloo, ~8%
    of 2-rank runs otherwise abort in a destructor after training finished (measured here)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
