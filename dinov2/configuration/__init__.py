"""Typed, validated configuration: every schema and default of the project, in one package.

``params`` (params.yaml, a section per stage), ``recipes`` (training runs), ``curation``, ``evaluation``,
``report`` (the stages' sections) and ``settings`` (the environment). Every schema derives from
``Section``, which refuses unknown keys, so a typo fails before any compute with an error that names the
key and the file.
"""

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration file or value that does not validate."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SectionT = TypeVar("SectionT", bound=Section)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``delta`` replaces the base value."""
    merged = copy.deepcopy(dict(base))
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}'")
        elif item["type"] == "missing":
            lines.append(f"{source}: missing required key '{where}'")
        else:
            lines.append(f"{source}: '{where}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def validate(schema: type[SectionT], data: Mapping[str, Any], source: str) -> SectionT:
    """Validate a mapping against a schema; the error names every bad key and where it came from."""
    try:
        return schema.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(_describe(error, source)) from None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for logging a nested config as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
