"""The ``pipeline`` flow: the DVC pipeline (dvc.yaml) stage by stage, one Prefect task per stage.

Each task is ``dvc repro <stage>``: DVC decides what is out of date and runs the stage's ``dinov2``
command; Prefect adds the logs, retries, the flow-run tag on the MLflow runs and one results artifact
per stage (the stage's DVC metrics files and its MLflow runs).
"""

from pathlib import Path

import yaml
from prefect import flow

from flows.launchers import REPOSITORY
from flows.services import check_tracking_server
from flows.stages import DVC, publish_results, run_stage

PIPELINE_STAGES = ("prepare", "embed", "dedup", "retrieve", "pretrain", "distill", "evaluate", "report")


def read_stages(repository: Path) -> dict[str, dict]:
    path = repository / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the pipeline flows run `dvc repro` in a repository with a dvc.yaml")
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


def metrics_files(definition: dict) -> list[str]:
    """The metrics files a dvc.yaml stage declares (plain entries or ``{path: {cache: false}}``)."""
    body = definition.get("do", definition)  # a foreach stage declares them under do:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in body.get("metrics", [])]


def repro(stages: list[str], retries: int, repository: Path = REPOSITORY) -> dict[str, dict]:
    """``dvc repro`` each stage in turn; returns the metrics of each (from its first metrics file)."""
    check_tracking_server()
    defined = read_stages(repository)
    unknown = [stage for stage in stages if stage not in defined]
    if unknown:
        raise ValueError(
            f"stage(s) {', '.join(unknown)} not in {repository / 'dvc.yaml'} (it has {', '.join(defined)})"
        )
    results = {}
    for stage in stages:
        run_stage.with_options(retries=retries)(stage, [*DVC, "repro", stage], cwd=str(repository))
        files = metrics_files(defined[stage])
        metrics_file = str(repository / files[0]) if files and "${" not in files[0] else None
        results[stage] = publish_results(stage, f"dinov2/{stage}", metrics_file, notes=f"`dvc repro {stage}`")
    return results


@flow(name="pipeline")
def pipeline(stages: list[str] | None = None, retries: int = 1) -> dict[str, dict]:
    """The whole pipeline (prepare, embed, dedup, retrieve, pretrain, distill, evaluate, report) or the
    listed ``stages`` of it, in that order, through DVC."""
    defined = read_stages(REPOSITORY)
    return repro(list(stages or [stage for stage in PIPELINE_STAGES if stage in defined]), retries)
