"""`make up` / `make down` (python -m flows.services): idempotent, health-checked, refusing a busy port."""

import os
import socket

import pytest


@pytest.mark.slow
def test_up_again_finds_every_service_running_and_status_reports_them_healthy(services, flows_services):
    again = flows_services("up", services.environment)
    assert again.returncode == 0, again.stderr
    for name in ("prefect-server", "mlflow-server", "worker-local", "worker-gpu-cluster"):
        assert f"{name} already running" in again.stdout
    status = flows_services("status", services.environment)
    assert status.returncode == 0, status.stdout
    assert f"prefect-server     healthy        {services.prefect_api_url}/health" in status.stdout
    assert f"mlflow-server      healthy        {services.mlflow_url}/health" in status.stdout
    assert (services.state_dir / "env").read_text() == (
        f"export PREFECT_API_URL={services.prefect_api_url}\nexport MLFLOW_TRACKING_URI={services.mlflow_url}\n"
    )


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
    assert not (tmp_path / "services" / "pids").exists()


def test_down_with_nothing_running_is_a_no_op(tmp_path, flows_services):
    environment = {**os.environ, "DINOV2_SERVICES_DIR": str(tmp_path / "services")}
    result = flows_services("down", environment)
    assert result.returncode == 0 and result.stdout == ""
