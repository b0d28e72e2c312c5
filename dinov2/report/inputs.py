"""What the report reads: the output folders of the other stages, each optional, each checked before any work.

A folder given explicitly must exist and hold the files its stage writes (else a one-line error names
the folder and the file); a folder not given leaves its part of the page out, and the page says so.
"""

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

# Files each stage writes that the report cannot do without.
REQUIRED_FILES = {
    "prepare": ("ground_truth.parquet", "manifests/pool/manifest.parquet", "metrics.json"),
    "dedup": ("kept.parquet", "duplicate_groups.parquet", "metrics.json"),
    "retrieve": ("curated.parquet", "metrics.json"),
    "pretrain": ("metrics.json",),
    "distill": ("metrics.json",),
}
WRITTEN_BY = {
    "prepare": "dinov2 prepare-default",
    "dedup": "dinov2 dedup",
    "retrieve": "dinov2 retrieve",
    "pretrain": "dinov2 pretrain",
    "distill": "dinov2 distill",
}
# The pictures of an evaluation folder shown side by side, one row per picture.
EVALUATION_PICTURES = ("pca_patches", "segmentation_overlay")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class EvaluationInput:
    """``NAME=DIR`` or ``NAME=DIR:METRICS.json``: a ``dinov2 evaluate --out DIR`` folder and its metrics file
    (``--metrics``); without ``:METRICS.json`` the metrics are read from ``DIR/metrics.json``."""

    name: str
    folder: Path
    metrics_file: Path

    @classmethod
    def parse(cls, text: str) -> "EvaluationInput":
        name, equals, location = text.partition("=")
        if not equals or not name or not location:
            raise ValueError(f"--evaluation {text!r}: expected NAME=DIR or NAME=DIR:METRICS.json")
        if not _NAME.match(name):
            raise ValueError(f"--evaluation {text!r}: the name {name!r} may hold letters, digits, '_', '-', '.'")
        folder, colon, metrics = location.rpartition(":")
        if colon and metrics.endswith(".json") and folder:
            return cls(name, Path(folder), Path(metrics))
        return cls(name, Path(location), Path(location) / "metrics.json")


@dataclass
class ReportInputs:
    prepare: Path | None = None
    dedup: Path | None = None
    retrieve: Path | None = None
    pretrain: Path | None = None
    distill: Path | None = None
    evaluations: list[EvaluationInput] = field(default_factory=list)

    def check(self) -> None:
        """Every input given exists and holds what its stage writes; evaluation names are unique."""
        for stage, required in REQUIRED_FILES.items():
            folder = getattr(self, stage)
            if folder is None:
                continue
            if not folder.is_dir():
                raise FileNotFoundError(f"--{stage} {folder}: no such folder")
            for name in required:
                if not (folder / name).is_file():
                    raise FileNotFoundError(
                        f"--{stage} {folder} has no {name}: expected a folder written by `{WRITTEN_BY[stage]}`"
                    )
        names = [evaluation.name for evaluation in self.evaluations]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"--evaluation names must be unique; repeated: {', '.join(repeated)}")
        for evaluation in self.evaluations:
            if not evaluation.folder.is_dir():
                raise FileNotFoundError(f"--evaluation {evaluation.name}: no such folder {evaluation.folder}")
            if not evaluation.metrics_file.is_file():
                raise FileNotFoundError(
                    f"--evaluation {evaluation.name}: no metrics file {evaluation.metrics_file} "
                    "(give it as NAME=DIR:METRICS.json, the file `dinov2 evaluate --metrics` wrote)"
                )

    def not_given(self) -> list[str]:
        options = [f"--{stage}" for stage in REQUIRED_FILES if getattr(self, stage) is None]
        return options + ([] if self.evaluations else ["--evaluation"])


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not a {type(data).__name__}")
    return data


def read_history(path: Path) -> dict[str, np.ndarray]:
    """``plots/train.csv`` of a training run: column name -> values, ``step`` included."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0][:1] != ["step"]:
        raise ValueError(f"{path} must start with a header whose first column is 'step'")
    header, values = rows[0], rows[1:]
    for number, row in enumerate(values, start=2):
        if len(row) != len(header):
            raise ValueError(f"{path} line {number}: {len(row)} values for {len(header)} columns")
    table = np.array(values, dtype=np.float64).reshape(len(values), len(header))
    return {name: table[:, column] for column, name in enumerate(header)}


@dataclass
class TrainingRun:
    folder: Path
    metrics: dict[str, float]
    recipe: dict[str, Any] | None  # recipe.json, when the run wrote one
    history: dict[str, np.ndarray] | None  # plots/train.csv, when the run wrote one

    @classmethod
    def read(cls, folder: Path) -> "TrainingRun":
        recipe = folder / "recipe.json"
        history = folder / "plots" / "train.csv"
        return cls(
            folder,
            read_json(folder / "metrics.json"),
            read_json(recipe) if recipe.is_file() else None,
            read_history(history) if history.is_file() else None,
        )

    @property
    def recipe_name(self) -> str:
        return str((self.recipe or {}).get("name", "?"))


@dataclass
class Evaluation:
    name: str
    backbone: str
    dataset: str
    metrics: dict[str, float]
    pictures: dict[str, Path]  # picture name (EVALUATION_PICTURES) -> PNG in the evaluation folder

    @classmethod
    def read(cls, given: EvaluationInput) -> "Evaluation":
        data = read_json(given.metrics_file)
        datasets = [key for key in data if key != "backbone"]
        if len(datasets) != 1 or not isinstance(data[datasets[0]], dict):
            raise ValueError(
                f"{given.metrics_file}: expected {{'backbone': ..., '<dataset>': {{metric: value}}}} "
                f"(what `dinov2 evaluate --metrics` writes), found keys {sorted(data)}"
            )
        pictures = {name: given.folder / f"{name}.png" for name in EVALUATION_PICTURES}
        return cls(
            given.name,
            str(data.get("backbone", "?")),
            datasets[0],
            data[datasets[0]],
            {name: path for name, path in pictures.items() if path.is_file()},
        )


@dataclass
class Curation:
    """prepare + dedup + retrieve, each None when not given."""

    prepare_metrics: dict[str, Any] | None
    dedup_metrics: dict[str, Any] | None
    retrieve_metrics: dict[str, Any] | None
    scores: dict[str, float] | None  # score_curation: needs all three folders
    groups: list[list[dict[str, Any]]]  # duplicate_groups.parquet, one list per group, the kept image first
    truth: dict[str, dict[str, Any]]  # ground_truth.parquet by pool id
    paths: dict[str, str]  # pool id -> image path (the pool manifest)
    dedup_plot: Path | None  # the grid `dinov2 dedup` drew itself

    @classmethod
    def read(cls, inputs: ReportInputs) -> "Curation":
        truth, paths, groups, scores = {}, {}, [], None
        if inputs.prepare is not None:
            truth = {row["id"]: row for row in pq.read_table(inputs.prepare / "ground_truth.parquet").to_pylist()}
            manifest = pq.read_table(inputs.prepare / "manifests" / "pool" / "manifest.parquet", columns=["id", "path"])
            paths = dict(zip(manifest.column("id").to_pylist(), manifest.column("path").to_pylist(), strict=True))
        if inputs.dedup is not None:
            by_group: dict[str, list[dict[str, Any]]] = {}
            for row in pq.read_table(inputs.dedup / "duplicate_groups.parquet").to_pylist():
                by_group.setdefault(row["representative"], []).append(row)
            groups = [sorted(rows, key=lambda row: not row["kept"]) for rows in by_group.values()]
        if None not in (inputs.prepare, inputs.dedup, inputs.retrieve):
            from dinov2.demo_data.ground_truth import score_curation

            scores = score_curation(inputs.prepare / "ground_truth.parquet", inputs.dedup, inputs.retrieve)
        plot = inputs.dedup / "plots" / "duplicate_groups.png" if inputs.dedup is not None else None

        def metrics(folder: Path | None) -> dict[str, Any] | None:
            return read_json(folder / "metrics.json") if folder is not None else None

        return cls(
            metrics(inputs.prepare),
            metrics(inputs.dedup),
            metrics(inputs.retrieve),
            scores,
            groups,
            truth,
            paths,
            plot if plot is not None and plot.is_file() else None,
        )
