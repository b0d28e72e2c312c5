"""MLflow tracking shared by every stage: one experiment per stage, the same tags on every run.

Experiments are ``dinov2/<stage>``. Every run is tagged with the git commit (and whether the tree was
dirty), the stage, the recipe when there is one and the Prefect flow-run id when Prefect launched it;
the resolved configuration is logged as an artifact and, flattened, as params. Only rank 0 talks to
MLflow: on other ranks ``tracked_run`` yields a tracker that does nothing.

Metric keys are stable across runs so MLflow charts line up: ``<stage>/<name>``, or
``eval/<dataset>/<metric>`` (e.g. ``eval/cifar10/knn_top1_k20``). MLflow refuses ``@`` in names, so
the k of a kNN metric is written ``_k20``, not ``@20``.

Where runs go: ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5000``), otherwise a SQLite
store with file artifacts under ``outputs/mlflow/`` (never MLflow's implicit ``./mlruns``).
``DINOV2_TRACKING=off`` turns tracking off for a process (a machine without MLflow installed, a quick
benchmark): every tracker then does nothing, and registering a backbone is refused.
"""

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from dinov2.configuration import flatten
from dinov2.configuration.settings import Settings, variable

LOCAL_TRACKING_DIR = Path("outputs/mlflow")
PIPELINE_RUN_ENV = variable(Settings, "pipeline_run_id")  # set by `dinov2 pipeline` for its stage commands
TRACKING_ENV = variable(Settings, "tracking")
_MAX_PARAM_LENGTH = 6000
_PARAMS_PER_CALL = 100


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def tracking_enabled() -> bool:
    """False when ``DINOV2_TRACKING`` is ``off``; any value but ``on`` or ``off`` is refused by name."""
    return Settings.read().tracking == "on"


def tracking_uri() -> str:
    return Settings.read().mlflow_tracking_uri or f"sqlite:///{(LOCAL_TRACKING_DIR / 'mlflow.db').resolve()}"


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    """Commit and dirty flag of the code that runs (``unknown`` outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def run_tags(stage: str, recipe: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    settings = Settings.read()
    tags = {"dinov2.stage": stage, **git_state(Path(__file__).resolve().parent)}
    if recipe:
        tags["dinov2.recipe"] = recipe
    if settings.prefect_flow_run_id:
        tags["prefect.flow_run_id"] = settings.prefect_flow_run_id
    if settings.dvc_stage:
        tags["dvc.stage"] = settings.dvc_stage
    tags.update(extra or {})
    return tags


class Tracker:
    """Logging handle for one MLflow run."""

    def __init__(self, run_id: str | None):
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)

    def last_step(self, key: str) -> int:
        """The last step ``key`` was logged at in this run (0: never)."""
        if not self.active:
            return 0
        from mlflow import MlflowClient

        return max((metric.step for metric in MlflowClient().get_metric_history(self.run_id, key)), default=0)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.active:
            return
        import mlflow

        flat = {key: str(value)[:_MAX_PARAM_LENGTH] for key, value in flatten(params).items()}
        items = sorted(flat.items())
        for start in range(0, len(items), _PARAMS_PER_CALL):
            mlflow.log_params(dict(items[start : start + _PARAMS_PER_CALL]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        if self.active:
            import mlflow

            mlflow.log_dict(dict(data), artifact_file)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            import mlflow

            mlflow.set_tags(dict(tags))


def _experiment_id(name: str, uri: str) -> str:
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        artifact_location = artifacts.resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def _run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return False
    return True


@contextmanager
def tracked_run(
    stage: str,
    *,
    recipe: str | None = None,
    config: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[Tracker]:
    """An MLflow run in experiment ``dinov2/<stage>`` on rank 0; a do-nothing tracker elsewhere, and
    everywhere when ``DINOV2_TRACKING=off``.

    ``resume_run_id``: continue that run (a resumed training run keeps one MLflow run) when the
    tracking store still has it; otherwise a new run is opened.
    """
    if not tracking_enabled() or not is_rank_zero():
        yield Tracker(None)
        return
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(f"dinov2/{stage}", uri)
    parent = Settings.read().pipeline_run_id
    if parent and _run_exists(parent):
        # a stage of a pipeline run: a child run under the pipeline's parent, in its experiment
        experiment_id = mlflow.get_run(parent).info.experiment_id
        tags = {**(tags or {}), "mlflow.parentRunId": parent}
    if resume_run_id is not None and not _run_exists(resume_run_id):
        resume_run_id = None
    run_name = run_name or f"{stage} {datetime.now().strftime('%Y-%m-%d %H:%M')}"  # findable in the UI
    if resume_run_id is not None:
        started = mlflow.start_run(run_id=resume_run_id)
    else:
        started = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=run_tags(stage, recipe, tags))
    with started as run:
        tracker = Tracker(run.info.run_id)
        if resume_run_id is not None:
            tracker.set_tags(run_tags(stage, recipe, tags))
        elif config is not None:
            tracker.log_params(config)
            tracker.log_dict(config, "config/resolved.yaml")
        yield tracker


def log_stage(stage: str, config: Mapping[str, Any], metrics: Mapping[str, Any], out: Path) -> None:
    """One run of a stage that wrote ``out``: its config, numeric metrics, ``plots/`` and ``metrics.json``."""
    with tracked_run(stage, config=config) as tracker:
        tracker.log_metrics({key: value for key, value in metrics.items() if isinstance(value, int | float)})
        plots = out / "plots"
        if plots.is_dir() and any(plots.iterdir()):
            tracker.log_artifact(plots, "plots")
        tracker.log_artifact(out / "metrics.json")
