"""Each default lives in one schema: params.yaml and the recipes state only what they change, and dvc.yaml
tracks exactly the schema's sections."""

from pathlib import Path

import pytest
import yaml

from dinov2.configuration import flatten
from dinov2.configuration.params import SECTIONS, Params, load_params, section_schema
from dinov2.configuration.recipes import RECIPE_DIR, DistillRecipe, Recipe, load_recipe, recipe_delta

REPOSITORY = Path(__file__).resolve().parents[1]


def leaves(data: dict) -> dict:
    """Flattened keys; an empty mapping is no key."""
    return {key: value for key, value in flatten(data).items() if value != {}}


def test_every_schema_builds_without_input_and_the_repository_params_validate_as_a_whole():
    defaults = Params()
    assert tuple(type(defaults).model_fields) == SECTIONS
    resolved = load_params(REPOSITORY / "params.yaml")
    assert resolved.training_recipe("pretrain").name == "cpu_tiny"
    assert resolved.training_recipe("distill").optim.epochs == 24


def test_params_yaml_states_only_what_the_pipeline_changes():
    stated = yaml.safe_load((REPOSITORY / "params.yaml").read_text())
    assert list(stated) == list(SECTIONS), "params.yaml names every section, in the stages' order"
    restated = []
    for section, values in stated.items():
        if section in ("pretrain", "distill"):
            values = dict(values)
            schema = DistillRecipe if section == "distill" else Recipe
            defaults = load_recipe(values.pop("recipe"), schema=schema).model_dump(mode="json")
        else:
            defaults = section_schema(section)().model_dump(mode="json")
        flat_defaults = flatten(defaults)
        for key, value in leaves(values).items():
            if key in flat_defaults and flat_defaults[key] == value:
                restated.append(f"{section}.{key}")
    assert restated == [], f"params.yaml restates schema defaults: {restated}"


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda path: path.stem)
def test_every_recipe_states_only_what_it_changes_from_its_base(path):
    stated = yaml.safe_load(path.read_text())
    base = stated.pop("base", "default")
    schema = DistillRecipe if "distillation" in recipe_delta(path)[0] else Recipe
    inherited = flatten(load_recipe(base, schema=schema).model_dump(mode="json"))
    restated = [key for key, value in leaves(stated).items() if inherited.get(key) == value]
    assert restated == [], f"{path.name} restates what {base} already sets: {restated}"
    assert load_recipe(path.stem, schema=schema).name == path.stem


def test_dvc_yaml_tracks_exactly_the_schema_sections_and_every_stage_reads_params_yaml():
    pipeline = yaml.safe_load((REPOSITORY / "dvc.yaml").read_text())
    tracked = {}
    for name, stage in pipeline["stages"].items():
        definition = stage.get("do", stage)
        assert "--params params.yaml" in " ".join(definition["cmd"].split()), name
        for entry in definition.get("params", []):
            tracked.setdefault(entry.split(".")[0], []).append(name)
    assert sorted(tracked) == sorted(SECTIONS)
    assert set(SECTIONS) <= set(pipeline["stages"]), "each section is named for the stage that reads it"
