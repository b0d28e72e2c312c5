"""`dinov2 pipeline`: `dvc repro` under one parent MLflow run.

The parent run (experiment ``dinov2/pipeline``) holds one child run per stage that ran: the stage
commands see ``DINOV2_PIPELINE_RUN_ID`` and open their runs under it. When DVC is done, each child
is tagged with the hash of its stage's dependencies from ``dvc.lock`` (the same hash for the same
inputs, whichever machine ran it), and the parent gets ``dvc.lock``, ``params.yaml`` and the report.
Plain ``dvc repro`` runs the same stages, each in its own experiment ``dinov2/<stage>``.
"""

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import yaml

from dinov2.tracking import PIPELINE_RUN_ENV, tracked_run

REPORT = Path("outputs/report")


def stage_hashes(lock_file: Path) -> dict[str, str]:
    """Stage name (``embed@pool`` for foreach stages) -> sha256 of its dependencies as dvc.lock records them."""
    if not lock_file.is_file():
        return {}
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    return {
        name: hashlib.sha256(json.dumps(entry.get("deps", []), sort_keys=True).encode()).hexdigest()
        for name, entry in stages.items()
    }


def dvc_executable() -> str:
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.is_file() else "dvc"


def run_pipeline(dvc_arguments: list[str], repository: Path = Path(".")) -> int:
    """``dvc repro ARGS`` in ``repository`` under a parent MLflow run; returns DVC's exit code."""
    import mlflow

    if not (repository / "dvc.yaml").is_file():
        raise FileNotFoundError(f"no dvc.yaml in {repository.resolve()}: run the pipeline from the repository root")
    name = f"pipeline {datetime.now().strftime('%Y-%m-%d %H:%M')}"
    with tracked_run("pipeline", run_name=name, config={"dvc_arguments": " ".join(dvc_arguments)}) as tracker:
        environment = {**os.environ, PIPELINE_RUN_ENV: tracker.run_id}
        # the stage commands are `dinov2 ...`: the one of this interpreter, activated or not
        environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
        # stage commands inherit the tracking location, so children land beside their parent
        environment["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
        code = subprocess.run([dvc_executable(), "repro", *dvc_arguments], cwd=repository, env=environment).returncode
        client = mlflow.MlflowClient()
        hashes = stage_hashes(repository / "dvc.lock")
        children = client.search_runs(
            [mlflow.get_run(tracker.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{tracker.run_id}'"
        )
        for child in children:
            stage = child.data.tags.get("dvc.stage")
            if stage in hashes:
                client.set_tag(child.info.run_id, "dvc.deps_hash", hashes[stage])
        tracker.log_metrics({"pipeline/stages_run": len(children), "pipeline/dvc_exit_code": code})
        for path in (repository / "dvc.lock", repository / "params.yaml"):
            if path.is_file():
                tracker.log_artifact(path)
        if (repository / REPORT).is_dir():
            tracker.log_artifact(repository / REPORT, "report")
        run_id = tracker.run_id
    if code != 0:
        mlflow.MlflowClient().set_terminated(run_id, status="FAILED")
    return code
