"""Command-line options every stage command shares."""

import typer

PARAMS = typer.Option(
    None,
    help="params.yaml-style file whose section for this command is read [default: ./params.yaml if there is "
    "one, else the schemas' defaults].",
)
RECIPE = typer.Option(
    None, help="A recipe of configs/recipes/ (cpu_tiny, vitg14, ...) or a .yaml path [default: the params section's]."
)
OVERRIDES = typer.Option([], "--set", help="Recipe override, e.g. --set optim.epochs=20 (repeatable).")
CHECKPOINTS = typer.Option(
    None,
    help="Keep the run's checkpoints in a folder of their own under this one, keyed by the recipe and inputs, "
    "so a run resumes even after its output folder is deleted (as `dvc repro` does) [default: OUTPUT/checkpoints].",
)
