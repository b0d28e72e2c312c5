"""The curate and pipeline flows run `dvc repro <stage>` for real, in a small DVC repository whose two
stages count their own runs: what reran and what did not, the metrics artifact, an unknown stage."""

import subprocess
import sys
import textwrap

import pytest
import yaml
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows.curate import curate
from flows.pipeline import pipeline

pytestmark = pytest.mark.slow

# Each stage appends its name to runs.txt (outside DVC's outputs) and writes its metrics.
STAGE = (
    "python -c \"import json, pathlib, yaml; n = yaml.safe_load(open('params.yaml'))['{stage}']['n']; "
    "open('runs.txt', 'a').write('{stage}\\\\n'); out = pathlib.Path('outputs/{stage}'); out.mkdir(parents=True, "
    "exist_ok=True); (out / 'metrics.json').write_text(json.dumps({{'{stage}/images': n}}))\""
)


@pytest.fixture
def dvc_repository(tmp_path, monkeypatch, services):
    repository = tmp_path / "repository"
    repository.mkdir()
    dvc_yaml = {
        "metrics": ["outputs/prepare/metrics.json", "outputs/embed/metrics.json"],
        "stages": {
            "prepare": {"cmd": STAGE.format(stage="prepare"), "params": ["prepare"], "outs": ["outputs/prepare"]},
            "embed": {
                "cmd": STAGE.format(stage="embed"),
                "deps": ["outputs/prepare"],
                "params": ["embed"],
                "outs": ["outputs/embed"],
            },  # fmt: skip
        },
    }
    (repository / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    (repository / "params.yaml").write_text(textwrap.dedent("prepare: {n: 3}\nembed: {n: 5}\n"))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repository, check=True)
    monkeypatch.chdir(repository)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", services.mlflow_url)
    with temporary_settings({PREFECT_API_URL: services.prefect_api_url, PREFECT_HOME: tmp_path / "prefect"}):
        yield repository


def test_curate_reruns_only_the_stages_whose_inputs_changed(dvc_repository, services):
    first = curate(stages=["prepare", "embed"], retries=0, return_state=True)
    assert first.is_completed(), first.message
    assert first.result() == {
        "prepare": {str(dvc_repository / "outputs/prepare/metrics.json"): {"prepare/images": 3}},
        "embed": {str(dvc_repository / "outputs/embed/metrics.json"): {"embed/images": 5}},
    }
    # only embed's parameter changes: prepare is up to date, embed runs again
    (dvc_repository / "params.yaml").write_text("prepare: {n: 3}\nembed: {n: 6}\n")
    second = pipeline(retries=0, return_state=True)
    assert second.is_completed(), second.message
    assert (dvc_repository / "runs.txt").read_text().splitlines() == ["prepare", "embed", "embed"]
    artifacts = services.api(
        "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(second.state_details.flow_run_id)]}}}
    )
    results = {artifact["key"]: artifact["data"] for artifact in artifacts}
    assert "| `embed/images` | 6 |" in results["embed-results"]
    assert "| `prepare/images` | 3 |" in results["prepare-results"]


def test_an_unknown_stage_fails_before_dvc_runs_naming_it(dvc_repository):
    state = curate(stages=["prepare", "dedupe"], retries=0, return_state=True)
    assert state.is_failed()
    assert "stage(s) dedupe not in" in state.message and "(it has prepare, embed)" in state.message
    assert not (dvc_repository / "runs.txt").exists()


def test_a_repository_without_a_pipeline_fails_naming_its_dvc_yaml(dvc_repository, tmp_path):
    elsewhere = tmp_path / "not-a-checkout"
    elsewhere.mkdir()
    state = pipeline(retries=0, repository=str(elsewhere), return_state=True)
    assert state.is_failed()
    assert f"{elsewhere / 'dvc.yaml'} not found" in state.message
