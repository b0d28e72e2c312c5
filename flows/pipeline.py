"""The ``pipeline`` flow: the DVC pipeline (dvc.yaml) stage by stage, one Prefect task per stage.

Each task is ``dvc repro <stage>`` in the repository: the flow run's working directory (the checkout the
deployments' pull step sets), or the folder the ``repository`` parameter names (another checkout of the
project, with its own params.yaml, on the worker's machine). DVC decides what is out of date and runs the
stage's ``dinov2`` command; Prefect adds the logs, retries, the flow-run tag on the MLflow runs and one
results artifact per stage (the DVC metrics files under ``outputs/<stage>/`` and the stage's MLflow runs).
"""

from pathlib import Path

import yaml
from prefect import flow

from flows.services import check_tracking_server
from flows.stages import DVC, publish_results, run_stage

PIPELINE_STAGES = (
    *("prepare", "descriptor", "embed", "embed_retrieval", "dedup", "retrieve"),
    *("pretrain", "distill", "evaluate", "report"),
)


def read_pipeline(repository: Path) -> dict:
    path = repository / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the pipeline flows run `dvc repro` in a repository with a dvc.yaml")
    return yaml.safe_load(path.read_text()) or {}


def metrics_files(pipeline: dict, stage: str) -> list[str]:
    """The DVC metrics files of a stage: declared at the top of dvc.yaml or in the stage (plain entries
    or ``{path: {cache: false}}``), and inside the stage's ``outputs/<stage>/`` folder."""
    definition = pipeline.get("stages", {}).get(stage, {})
    entries = [*pipeline.get("metrics", []), *definition.get("do", definition).get("metrics", [])]
    paths = [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries]
    return [path for path in dict.fromkeys(paths) if path.startswith(f"outputs/{stage}/") and "${" not in path]


def checkout(repository: str | None) -> Path:
    """The folder the flows run DVC in: ``repository``, or the working directory when it is not given."""
    return Path(repository).resolve() if repository else Path.cwd()


def repro(stages: list[str], retries: int, repository: str | None = None) -> dict[str, dict]:
    """``dvc repro`` each stage in turn in ``repository`` (default: the working directory); returns each
    stage's metrics by file."""
    repository = checkout(repository)
    pipeline = read_pipeline(repository)
    defined = list(pipeline.get("stages", {}))
    unknown = [stage for stage in stages if stage not in defined]
    if unknown:
        raise ValueError(
            f"stage(s) {', '.join(unknown)} not in {repository / 'dvc.yaml'} (it has {', '.join(defined)})"
        )
    check_tracking_server()
    results = {}
    for stage in stages:
        run_stage.with_options(retries=retries)(stage, [*DVC, "repro", stage], cwd=str(repository))
        files = [str(repository / path) for path in metrics_files(pipeline, stage)]
        results[stage] = publish_results(stage, f"dinov2/{stage}", files, notes=f"`dvc repro {stage}`")
    return results


@flow(name="pipeline")
def pipeline(stages: list[str] | None = None, retries: int = 1, repository: str | None = None) -> dict[str, dict]:
    """The whole pipeline (prepare, embed, dedup, retrieve, pretrain, distill, evaluate, report) or the
    listed ``stages`` of it, in that order, through DVC, in ``repository`` (default: the working directory)."""
    defined = read_pipeline(checkout(repository)).get("stages", {})
    return repro(list(stages or [stage for stage in PIPELINE_STAGES if stage in defined]), retries, repository)
