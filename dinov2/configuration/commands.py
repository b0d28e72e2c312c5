"""``dinov2 config``: a params section or a recipe as it resolves, every default included."""

from pathlib import Path

import typer
import yaml

from dinov2.options import OVERRIDES, PARAMS, RECIPE


def register(app: typer.Typer) -> None:
    @app.command()
    def config(
        section: str | None = typer.Argument(
            None, help="A params section (prepare, dedup, pretrain, ...); every section when omitted."
        ),
        params: Path | None = PARAMS,
        recipe: str | None = RECIPE,
        override: list[str] = OVERRIDES,
    ) -> None:
        """Print the configuration a stage runs with, as YAML: the schema's defaults with params.yaml (and, for
        pretrain and distill, the recipe and --set overrides) on top."""
        from dinov2.configuration.params import SECTIONS, load_section, training_recipe

        if section is not None and section not in SECTIONS:
            raise ValueError(f"unknown section {section!r}; known sections: {', '.join(SECTIONS)}")
        if (recipe or override) and section not in ("pretrain", "distill"):
            raise ValueError("--recipe and --set apply to the pretrain and distill sections")
        resolved = {}
        for name in [section] if section else SECTIONS:
            if name in ("pretrain", "distill"):
                model = training_recipe(params, name, recipe, override)
            else:
                model = load_section(params, name)
            resolved[name] = model.model_dump(mode="json")
        typer.echo(yaml.safe_dump(resolved, sort_keys=False, width=120), nl=False)
