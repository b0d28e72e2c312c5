"""A stage command as a Prefect task, and the Markdown artifact that reports what it produced.

The flows never train, embed or evaluate themselves: every task runs a ``dinov2`` command (or ``dvc
repro``) as a subprocess, the same command a person types. Its output goes into the Prefect logs line by
line; the flow-run id and the MLflow tracking URI go into its environment, so the stage's MLflow run
carries the ``prefect.flow_run_id`` tag and the artifact can link to it.

Failures: exit code 2 is bad input, 3 a non-finite loss and 4 a collapsed objective (the ``dinov2``
command's codes), 127 a command that is not there: retrying cannot help, so the task fails at once.
Anything else (a crash, a kill, a lost node) is retried; a pretraining run then resumes from its newest
checkpoint, because the engine does that by itself.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from dinov2.tracking import tracking_uri

# The commands as this interpreter runs them: a worker's PATH need not include the virtual environment.
DINOV2 = [sys.executable, "-m", "dinov2"]
DVC = [sys.executable, "-m", "dvc"]
NON_TRANSIENT_EXIT_CODES = {2: "bad input", 3: "non-finite loss", 4: "collapsed objective", 127: "command not found"}
OUTPUT_TAIL_LINES = 20


def named_run(what: str, default_what: str, where: str, default_where: str):
    """A flow's ``flow_run_name``: ``<what> -> <where>`` from the run's parameters (the recipe or the backbone,
    and the output folder), as the MLflow run of the stage is named, so one run is told apart from another of
    the same flow in both UIs."""

    def name() -> str:
        parameters = flow_run.parameters
        return f"{parameters.get(what) or default_what} -> {parameters.get(where) or default_where}"

    return name


class StageFailed(RuntimeError):
    """A stage command exited with a failure; ``transient`` says whether running it again may succeed."""

    def __init__(self, stage: str, command: list[str], returncode: int, output_tail: list[str]):
        self.stage, self.command, self.returncode = stage, command, returncode
        self.transient = returncode not in NON_TRANSIENT_EXIT_CODES
        # The dinov2 command states bad input as one `error: ...` line: that line is the whole story.
        errors = [line.removeprefix("error:").strip() for line in output_tail if line.startswith("error:")]
        if not self.transient and errors:
            message = f"{stage}: {errors[-1]}"
        else:
            reason = NON_TRANSIENT_EXIT_CODES.get(returncode) or (
                f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
            )
            message = f"{stage} failed ({reason}): {shlex.join(command)}\n" + "\n".join(output_tail)
        super().__init__(message)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a transient stage failure, nothing else."""
    try:
        state.result()
    except StageFailed as failure:
        return failure.transient
    except Exception:
        return False
    return True


def stage_environment() -> dict[str, str]:
    """The environment of a stage command: the flow-run id for its MLflow tags, the MLflow store the flow
    reads back (also when the stage runs in another folder), unbuffered output for line-by-line logs."""
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "PYTHONUNBUFFERED": "1"}
    # dvc.yaml's commands call `dinov2` and `python` by name: this interpreter's environment comes first
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    environment.setdefault("COLUMNS", "160")  # rich wraps tables at 80 columns without a terminal
    if flow_run.id:
        environment["PREFECT__FLOW_RUN_ID"] = flow_run.id
    return environment


def run_command(stage: str, command: list[str], cwd: str | Path | None = None) -> list[str]:
    """Run ``command``, logging each output line (stdout and stderr) as it comes; returns the last lines;
    raises StageFailed when it fails."""
    logger = get_run_logger()
    logger.info("$ %s", shlex.join(command))
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", bufsize=1, env=stage_environment(), cwd=cwd,
        )  # fmt: skip
    except FileNotFoundError as error:
        raise StageFailed(stage, command, 127, [f"error: {command[0]} not found: {error.strerror}"]) from None
    try:
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            logger.info(line)
        returncode = process.wait()
    finally:
        # A cancelled or crashed flow run must not leave the stage running on its own.
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    if returncode != 0:
        raise StageFailed(stage, command, returncode, list(tail))
    return list(tail)


def run_json_command(stage: str, command: list[str]) -> dict[str, Any]:
    """Run a command that prints one JSON object on stdout (a dry run); its stderr goes to the logs."""
    logger = get_run_logger()
    logger.info("$ %s", shlex.join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=stage_environment(), timeout=600)
    except FileNotFoundError as error:
        raise StageFailed(stage, command, 127, [f"error: {command[0]} not found: {error.strerror}"]) from None
    for line in result.stderr.splitlines():
        logger.info(line)
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).splitlines()
        raise StageFailed(stage, command, result.returncode, lines[-OUTPUT_TAIL_LINES:])
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        got = result.stdout[:300]
        raise StageFailed(stage, command, 2, [f"error: expected one JSON object on stdout, got: {got}"]) from None


# Never cached: whether a stage needs to run again is DVC's or the engine's decision, not Prefect's.
@task(
    retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE,
    task_run_name="{stage}",
)  # fmt: skip
def run_stage(stage: str, command: list[str], cwd: str | None = None) -> list[str]:
    """One stage command; transient failures are retried (``run_stage.with_options(retries=N)``)."""
    return run_command(stage, command, cwd)


@dataclass(frozen=True)
class MlflowRun:
    run_id: str
    run_name: str
    status: str
    link: str


def mlflow_runs(experiment: str, prefect_flow_run_id: str) -> list[MlflowRun]:
    """The runs of ``experiment`` tagged with this flow run's id, newest first (a retried stage has several)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{prefect_flow_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else None

    def link(run_id: str) -> str:
        return f"{base}/#/experiments/{found.experiment_id}/runs/{run_id}" if base else f"{uri} run {run_id}"

    return [MlflowRun(run.info.run_id, run.info.run_name, run.info.status, link(run.info.run_id)) for run in runs]


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = [
        f"| `{key}` | {f'{value:.6g}' if isinstance(value, float) else value} |"
        for key, value in sorted(metrics.items())
    ]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys hold only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


@task(task_run_name="report-{stage}", cache_policy=NO_CACHE)
def publish_results(stage: str, experiment: str, metrics_files: list[str], notes: str = "") -> dict[str, Any]:
    """A Markdown artifact with the stage's metrics files as tables and links to its MLflow runs; returns
    the metrics of each file that exists, by path."""
    found: dict[str, Any] = {}
    lines = [f"# {stage}", ""]
    if notes:
        lines += [notes, ""]
    for path in metrics_files:
        if Path(path).is_file():
            found[path] = json.loads(Path(path).read_text())
            lines += [f"Metrics from `{path}`:", "", metrics_table(found[path]), ""]
        else:
            lines += [f"No metrics file at `{path}` on the worker's machine.", ""]
    runs = mlflow_runs(experiment, flow_run.id) if flow_run.id else []
    if runs:
        lines += [f"MLflow runs in `{experiment}` tagged `prefect.flow_run_id={flow_run.id}`:", ""]
        lines += [f"- [{run.run_name}]({run.link}) ({run.status})" for run in runs]
    else:
        lines += [f"No MLflow run in `{experiment}` carries `prefect.flow_run_id={flow_run.id}`."]
    create_markdown_artifact("\n".join(lines), key=artifact_key(stage, "results"), description=f"{stage} results")
    return found
