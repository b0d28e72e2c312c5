"""`make up` / `make down` (python -m flows.services, programs under supervisord): idempotent, health-checked,
refusing a busy port or a bad setting, and leaving no process behind, not even a flow run's."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

# A flow that starts a child and waits for it: a flow run busy with a command when `down` comes.
SLEEPY_FLOW = """
import os, subprocess, sys
from pathlib import Path
from prefect import flow

@flow
def sleepy(marker: str):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(marker).write_text(f"{os.getpid()} {child.pid}")
    child.wait()
"""
DEPLOY_AND_RUN = """
import sys
from prefect import flow
from prefect.deployments import run_deployment
source, marker = sys.argv[1:]
flow.from_source(source=source, entrypoint="sleepy.py:sleepy").deploy(
    name="sleepy", work_pool_name="local", print_next_steps=False, ignore_warnings=True
)
run_deployment("sleepy/sleepy", parameters={"marker": marker}, timeout=0)
"""


@pytest.mark.slow
def test_up_again_finds_every_service_running_and_status_reports_them_healthy(services, flows_services):
    again = flows_services("up", services.environment)
    assert again.returncode == 0, again.stderr
    for name in ("prefect-server", "mlflow-server", "worker-local", "worker-gpu-cluster"):
        assert f"{name} already running" in again.stdout
    status = flows_services("status", services.environment)
    assert status.returncode == 0, status.stdout
    assert status.stdout.splitlines() == [
        f"prefect-server     healthy        {services.prefect_api_url}/health",
        f"mlflow-server      healthy        {services.mlflow_url}/health",
        "worker-local       healthy        pool local",
        "worker-gpu-cluster healthy        pool gpu-cluster",
    ]
    assert (services.state_dir / "env").read_text() == (
        f"export PREFECT_API_URL={services.prefect_api_url}\nexport MLFLOW_TRACKING_URI={services.mlflow_url}\n"
    )
    # supervisord runs each program; pids/ records the process it runs
    tree = services.process_tree()
    for name in ("prefect-server", "mlflow-server", "worker-local", "worker-gpu-cluster"):
        assert json.loads((services.state_dir / "pids" / f"{name}.json").read_text())["pid"] in tree


def test_up_refuses_a_port_another_process_holds_and_starts_nothing(tmp_path, flows_services, unused_port):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        environment = {
            **os.environ, "DINOV2_SERVICES_DIR": str(tmp_path / "services"), "DINOV2_PREFECT_PORT": str(port),
            "DINOV2_MLFLOW_PORT": str(unused_port()),
        }  # fmt: skip
        result = flows_services("up", environment)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: 127.0.0.1:{port} is in use by another process; stop it or choose another port (DINOV2_PREFECT_PORT)\n"
    )
    # no supervisord was started, so no program either
    assert not (tmp_path / "services" / "supervisord.pid").exists()
    assert not (tmp_path / "services" / "pids").exists()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DINOV2_PREFECT_PORT", "http", "DINOV2_PREFECT_PORT='http': Input should be a valid integer"),
        ("DINOV2_MLFLOW_PORT", "70000", "DINOV2_MLFLOW_PORT='70000': Input should be less than 65536"),
        ("DINOV2_WORK_POOLS", ",", "DINOV2_WORK_POOLS=',': Value error, names no work pool"),
    ],
)
def test_a_bad_setting_stops_up_with_one_line_naming_the_variable(tmp_path, flows_services, variable, value, message):
    environment = {**os.environ, "DINOV2_SERVICES_DIR": str(tmp_path / "services"), variable: value}
    result = flows_services("up", environment)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "services").exists()


def test_down_with_nothing_running_is_a_no_op(tmp_path, flows_services):
    environment = {**os.environ, "DINOV2_SERVICES_DIR": str(tmp_path / "services")}
    result = flows_services("down", environment)
    assert result.returncode == 0 and result.stdout == ""


@pytest.mark.slow
def test_down_ends_a_running_flow_run_with_its_command_then_everything_else(
    tmp_path, flows_services, unused_port, processes_under, process_alive
):
    """Its own services (one work pool): `down` would end the session's."""
    state = tmp_path / "services"
    prefect_port, mlflow_port = unused_port(), unused_port()
    environment = {
        **{key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")},
        "DINOV2_SERVICES_DIR": str(state), "DINOV2_PREFECT_PORT": str(prefect_port),
        "DINOV2_MLFLOW_PORT": str(mlflow_port), "DINOV2_WORK_POOLS": "local", "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }  # fmt: skip
    started = flows_services("up", environment)
    supervisord = int((state / "supervisord.pid").read_text()) if (state / "supervisord.pid").is_file() else None
    pids = processes_under(supervisord)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        (tmp_path / "source").mkdir()
        (tmp_path / "source" / "sleepy.py").write_text(textwrap.dedent(SLEEPY_FLOW))
        marker = tmp_path / "flow-run.pids"
        client = {**environment, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
        deployed = subprocess.run(
            [sys.executable, "-c", DEPLOY_AND_RUN, str(tmp_path / "source"), str(marker)], env=client,
            cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        deadline = time.monotonic() + 180
        while not marker.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.is_file(), (state / "logs" / "worker-local.log").read_text()[-3000:]
        flow_run, command = map(int, marker.read_text().split())
        worker = json.loads((state / "pids" / "worker-local.json").read_text())["pid"]
        # the flow run runs under the worker, in a session of its own
        assert flow_run in processes_under(worker) and os.getsid(flow_run) != os.getsid(worker)
        pids |= processes_under(supervisord)
    finally:
        stopped = flows_services("down", environment)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        "worker-local stopped", "prefect-server stopped", "mlflow-server stopped"
    ]  # fmt: skip
    assert not process_alive(flow_run) and not process_alive(command)
    assert sorted(pid for pid in pids if process_alive(pid)) == []
    # again: nothing to stop, nothing printed; status names every program stopped
    again = flows_services("down", environment)
    assert again.returncode == 0 and again.stdout == ""
    status = flows_services("status", environment)
    assert status.returncode == 1
    assert [line.split()[:2] for line in status.stdout.splitlines()] == [
        ["prefect-server", "stopped"], ["mlflow-server", "stopped"], ["worker-local", "stopped"]
    ]  # fmt: skip
