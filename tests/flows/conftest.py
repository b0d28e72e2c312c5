"""One real set of local services per test session: a Prefect server, a worker on each work pool and an
MLflow server on 127.0.0.1 under supervisord, started and stopped exactly as `make up` / `make down` do it."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


@dataclass(frozen=True)
class LocalServices:
    prefect_api_url: str
    mlflow_url: str
    state_dir: Path
    environment: dict[str, str]  # what a shell pointed at these services has (for the prefect CLI)

    def api(self, path: str, body: dict | None = None):
        """GET (or POST ``body`` to) the Prefect API; returns the decoded JSON."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.prefect_api_url}{path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def log_messages(self, flow_run_id: str, timeout: float = 60) -> list[str]:
        """Every log line of a flow run, oldest first (the API answers 200 at a time). The run's process sends
        its logs in batches, the last after the run is marked completed: for a completed run this waits (up to
        ``timeout``) for the flow run's own closing "Finished in state Completed()" line (each task run logs
        one too, with its task run id, long before), so no line is missing."""
        completed = self.api(f"/flow_runs/{flow_run_id}")["state"]["type"] == "COMPLETED"
        deadline = time.monotonic() + timeout
        while True:
            entries: list[dict] = []
            while page := self.api(
                "/logs/filter",
                {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "offset": len(entries)},
            ):
                entries += page
            messages = [entry["message"] for entry in entries]
            finished = any(
                entry["task_run_id"] is None and entry["message"].startswith("Finished in state Completed")
                for entry in entries
            )
            if not completed or finished or time.monotonic() > deadline:
                return messages
            time.sleep(1)

    def log_delivery_errors(self) -> list[str]:
        """What the local worker's flow runs wrote on failing to send a batch of logs to the API."""
        log = self.state_dir / "logs" / "worker-local.log"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        return [" ".join(lines[i : i + 2]) for i, line in enumerate(lines) if "Error logging to API" in line]

    def supervisord_pid(self) -> int | None:
        path = self.state_dir / "supervisord.pid"
        return int(path.read_text()) if path.is_file() else None

    def process_tree(self) -> set[int]:
        """supervisord and every process under it: the programs, their children, the flow runs of the workers."""
        return process_tree(self.supervisord_pid())


def services_command(action: str, environment: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.services", action],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def process_tree(root: int | None) -> set[int]:
    """``root`` and all its descendants (by parent pid, whatever their session), as ``ps`` lists them now."""
    if root is None:
        return set()
    listing = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in listing.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found if process_runs(root) else set()


def process_runs(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.fixture(scope="session")
def processes_under():
    """A function: a process id and all its descendants now (by parent pid, whatever their session)."""
    return process_tree


@pytest.fixture(scope="session")
def process_alive():
    """A function: whether a process id runs (a zombie waiting to be reaped does not)."""
    return process_runs


@pytest.fixture(scope="session")
def flows_services():
    """``python -m flows.services ACTION`` (what `make up` / `make down` run) with a given environment."""
    return services_command


@pytest.fixture(scope="session")
def services(tmp_path_factory, unused_port) -> Iterator[LocalServices]:
    state = tmp_path_factory.mktemp("services")
    prefect_port, mlflow_port = unused_port(), unused_port()
    environment = {
        key: value for key, value in os.environ.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")
    }
    environment.update(
        DINOV2_SERVICES_DIR=str(state), DINOV2_PREFECT_PORT=str(prefect_port), DINOV2_MLFLOW_PORT=str(mlflow_port),
        PREFECT_HOME=str(state / "prefect"),
        # the worker asks for new flow runs every second instead of every 10 s: the tests wait less
        PREFECT_WORKER_QUERY_SECONDS="1",
    )  # fmt: skip
    started = services_command("up", environment)
    running = LocalServices(
        f"http://127.0.0.1:{prefect_port}/api",
        f"http://127.0.0.1:{mlflow_port}",
        state,
        {
            **environment,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        },
    )
    pids = running.process_tree()
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield running
    finally:
        pids |= running.process_tree()  # and what started since: flow runs, restarted workers
        stopped = services_command("down", environment)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        # `down` leaves nothing running that `up` or the workers started
        assert sorted(pid for pid in pids if process_runs(pid)) == []


@dataclass(frozen=True)
class DeclaredDeployment:
    """A deployment of prefect.yaml as `prefect deploy` reads it."""

    name: str  # FLOW/DEPLOYMENT, as `prefect deployment run` names it
    flow: Any  # the prefect Flow its entrypoint loads
    parameters: dict
    work_pool: dict  # name, work_queue_name, job_variables


@pytest.fixture(scope="session")
def declared_deployments() -> list[DeclaredDeployment]:
    """prefect.yaml's deployments, read by Prefect's own model of the file (what `prefect deploy` validates it with),
    each with the flow its entrypoint imports."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    config = PrefectYamlModel.model_validate(yaml.safe_load((REPOSITORY / "prefect.yaml").read_text()))
    declared = []
    for entry in config.deployments:
        flow = load_flow_from_entrypoint(str(REPOSITORY / entry.entrypoint))
        pool = entry.work_pool.model_dump() if entry.work_pool else {}
        declared.append(DeclaredDeployment(f"{flow.name}/{entry.name}", flow, entry.parameters, pool))
    return declared


@pytest.fixture(scope="session")
def deployed(services) -> subprocess.CompletedProcess:
    """`prefect deploy --all` from the repository, as a user runs it after `make up`."""
    return subprocess.run(
        [PREFECT, "deploy", "--all"], cwd=REPOSITORY, env=services.environment, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


class DeploymentRuns:
    """`prefect deployment run NAME -p ... --watch` started in the background, and finished later."""

    def __init__(self, services: LocalServices):
        self.services = services

    def start(self, name: str, *parameters: str) -> subprocess.Popen:
        command = [PREFECT, "deployment", "run", name, "--watch", "--watch-timeout", "540"]
        for parameter in parameters:
            command += ["-p", parameter]
        return subprocess.Popen(
            command, cwd=REPOSITORY, env=self.services.environment, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    @staticmethod
    def finish(process: subprocess.Popen) -> tuple[int, str, str]:
        """(exit code, flow-run id, output) of a started run."""
        output, _ = process.communicate(timeout=560)
        found = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert found, output
        return process.returncode, found.group(1), output


@pytest.fixture(scope="session")
def deployment_runs(services, deployed) -> DeploymentRuns:
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return DeploymentRuns(services)
