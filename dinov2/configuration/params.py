"""params.yaml: one section per stage, each validated by its schema before any work starts.

The schemas hold every default; params.yaml states only what the pipeline changes (a test keeps it that
way), so a key's value is its schema default unless params.yaml names it. ``pretrain`` and ``distill``
name a recipe (configs/recipes/) and may change any of its keys. ``dinov2 config`` prints a section as it
resolves, defaults included.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinov2.configuration import ConfigError, Section, read_yaml, validate
from dinov2.configuration.curation import DedupParams, DescriptorParams, EmbedParams, PrepareParams, RetrieveParams
from dinov2.configuration.evaluation import EvaluateParams
from dinov2.configuration.recipes import DEFAULT_RECIPE, DistillRecipe, Recipe, load_recipe
from dinov2.configuration.report import ReportParams

DEFAULT_PARAMS = Path("params.yaml")


class RecipeChoice(Section):
    """A training stage's section: a recipe, and any of its keys changed on top (checked against the recipe)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    recipe: str = Field(
        DEFAULT_RECIPE, description="a recipe of configs/recipes/ or a .yaml path; default: the schema's defaults"
    )

    def changes(self) -> dict[str, Any]:
        """The recipe keys this section changes."""
        return dict(self.model_extra or {})


class Params(Section):
    """Every stage's settings. A missing section, or key, takes the schema's default."""

    prepare: PrepareParams = Field(default_factory=PrepareParams)
    descriptor: DescriptorParams = Field(default_factory=DescriptorParams)
    embed: EmbedParams = Field(default_factory=EmbedParams)
    dedup: DedupParams = Field(default_factory=DedupParams)
    retrieve: RetrieveParams = Field(default_factory=RetrieveParams)
    pretrain: RecipeChoice = Field(default_factory=RecipeChoice)
    distill: RecipeChoice = Field(default_factory=RecipeChoice)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)

    @model_validator(mode="after")
    def _recipes_resolve(self) -> "Params":
        self.training_recipe("pretrain")
        self.training_recipe("distill")
        return self

    def training_recipe(self, section: str, recipe: str | None = None, overrides: list[str] | None = None) -> Recipe:
        """The recipe of ``pretrain`` or ``distill``: ``recipe`` (else the section's), its changes, ``overrides``."""
        choice: RecipeChoice = getattr(self, section)
        schema = DistillRecipe if section == "distill" else Recipe
        try:
            return load_recipe(recipe or choice.recipe, overrides, schema, choice.changes(), f"[{section}]")
        except ConfigError as error:
            raise ValueError(str(error)) from None


SECTIONS = tuple(Params.model_fields)


def read_params(path: str | Path) -> dict[str, Any]:
    """A params.yaml-style file as a mapping, checked to exist and to name only known sections."""
    data = read_yaml(path)
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{path}: unknown section{plural} {names}; known sections: {', '.join(SECTIONS)}")
    return data


def section_schema(section: str) -> type[BaseModel]:
    return Params.model_fields[section].annotation  # type: ignore[return-value]


def load_section(path: str | Path | None, section: str, schema: type[BaseModel] | None = None) -> Any:
    """One section, validated: of ``path``, else of ./params.yaml when there is one (DVC's convention),
    else the schema's defaults. A file the user named must exist."""
    schema = schema or section_schema(section)
    if path is None:
        if not DEFAULT_PARAMS.is_file():
            return schema()
        path = DEFAULT_PARAMS
    return validate(schema, read_params(path).get(section) or {}, f"{path} [{section}]")


def load_params(path: str | Path | None = None, data: Mapping[str, Any] | None = None) -> Params:
    """Every section of ``path`` (or of the mapping ``data``), validated, recipes resolved."""
    if data is None:
        data = read_params(path) if path is not None else {}
    return validate(Params, {name: value or {} for name, value in data.items()}, str(path or "params"))


def training_recipe(
    path: str | Path | None, section: str, recipe: str | None = None, overrides: list[str] | None = None
) -> Recipe:
    """The recipe a training stage runs: ``--recipe`` (else the params section's), the section's changes on
    top, then ``--set`` overrides; ``path`` as ``load_section`` reads it."""
    choice = load_section(path, section)
    schema = DistillRecipe if section == "distill" else Recipe
    source = f"{path or DEFAULT_PARAMS} [{section}]"
    return load_recipe(recipe or choice.recipe, overrides, schema, choice.changes(), source)
