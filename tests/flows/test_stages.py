"""A stage command as a Prefect task: transient failures are retried, bad input fails at once, the
flow-run id reaches the command; unreachable services are one line naming their URL."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows.stages import StageFailed, run_stage

REPOSITORY = Path(__file__).resolve().parents[2]

# Appends the flow-run id it sees to CALLS, prints its attempt number, then ends as the
# comma-separated OUTCOMES say for that attempt: an exit code, or "kill" (SIGKILL, as a lost node).
PROBE = """
import os, pathlib, signal, sys
calls, outcomes = pathlib.Path(sys.argv[1]), sys.argv[2].split(",")
attempt = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as record:
    record.write(os.environ.get("PREFECT__FLOW_RUN_ID", "none") + "\\n")
print(f"attempt {attempt + 1}", flush=True)
if outcomes[attempt] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if outcomes[attempt] == "2":
    print("error: the input is bad")
sys.exit(int(outcomes[attempt]))
"""


@flow
def one_stage(calls: str, outcomes: str, retries: int) -> list[str]:
    command = [sys.executable, "-c", PROBE, calls, outcomes]
    return run_stage.with_options(retries=retries, retry_delay_seconds=0)("probe", command)


@pytest.fixture
def prefect_api(services, tmp_path):
    with temporary_settings({PREFECT_API_URL: services.prefect_api_url, PREFECT_HOME: tmp_path / "prefect"}):
        yield services


@pytest.mark.slow
def test_a_killed_and_a_crashed_command_are_retried_until_it_succeeds(prefect_api, tmp_path):
    calls = tmp_path / "calls"
    state = one_stage(str(calls), "kill,1,0", retries=2, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == ["attempt 3"]
    flow_run_id = str(state.state_details.flow_run_id)
    assert calls.read_text().splitlines() == [flow_run_id] * 3


@pytest.mark.slow
def test_bad_input_fails_at_once_with_the_commands_own_message(prefect_api, tmp_path):
    calls = tmp_path / "calls"
    state = one_stage(str(calls), "2,0", retries=2, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match="^probe: the input is bad$"):
        state.result()
    assert len(calls.read_text().splitlines()) == 1


@pytest.mark.slow
def test_retries_run_out_on_a_command_that_keeps_failing(prefect_api, tmp_path):
    calls = tmp_path / "calls"
    state = one_stage(str(calls), "1,1,1", retries=1, return_state=True)
    assert state.is_failed()
    with pytest.raises(StageFailed, match=r"probe failed \(exit code 1\)"):
        state.result()
    assert len(calls.read_text().splitlines()) == 2


def run_flow_cli(environment: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows", "pretrain", "-p", "recipe=vitg14", "-p", "dry_run=true"],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def clean_environment(tmp_path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    return {**environment, "PREFECT_HOME": str(tmp_path / "prefect")}


def test_an_unreachable_prefect_api_is_one_line_naming_its_url(tmp_path, unused_port):
    url = f"http://127.0.0.1:{unused_port()}/api"
    result = run_flow_cli({**clean_environment(tmp_path), "PREFECT_API_URL": url}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: Prefect API at {url} (PREFECT_API_URL) is unreachable: ")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_an_unreachable_mlflow_server_is_one_line_naming_its_url(tmp_path, unused_port):
    url = f"http://127.0.0.1:{unused_port()}"
    result = run_flow_cli({**clean_environment(tmp_path), "MLFLOW_TRACKING_URI": url}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: MLflow tracking server at {url} (MLFLOW_TRACKING_URI) is unreachable: ")
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
