"""Local services for one person, as plain processes: a Prefect server, Prefect workers, an MLflow server.

``python -m flows.services up|down|status`` (what ``make up`` / ``make down`` run). Everything they keep
lives in one folder (``outputs/services/`` unless ``DINOV2_SERVICES_DIR`` says otherwise):

    prefect/          PREFECT_HOME of the server and the workers (SQLite database, local result storage)
    mlflow/           mlflow.db (SQLite backend store) and artifacts/ (served through the MLflow server)
    logs/<name>.log   each process's output
    pids/<name>.json  process id and command line of each process
    env               ``export`` lines pointing a shell at these services

``up`` returns once the servers answer their health endpoints and every worker has sent the Prefect
server a heartbeat; ``down`` stops the workers first (a worker waits for its flow runs and takes more than
15 s on SIGTERM), then the servers, each by process group. Both are idempotent. The servers bind
127.0.0.1 unless ``DINOV2_SERVICES_HOST`` names another address.
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
LOCAL_POOL = "local"
CLUSTER_POOL = "gpu-cluster"
STARTUP_TIMEOUT_S = 120.0
WORKER_STOP_TIMEOUT_S = 40.0
SERVER_STOP_TIMEOUT_S = 20.0
# No telemetry from the services or from the flow runs they start.
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}


class ServiceError(RuntimeError):
    """A service could not be started or reached; the message is one line for the user."""


@dataclass(frozen=True)
class ServiceSettings:
    host: str
    prefect_port: int
    mlflow_port: int
    state_dir: Path
    pools: tuple[str, ...]

    @classmethod
    def from_environment(cls) -> "ServiceSettings":
        def port(name: str, default: int) -> int:
            text = os.environ.get(name, str(default))
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise ServiceError(f"{name}={text!r} is not a TCP port (1-65535)")
            return int(text)

        pools = tuple(p for p in os.environ.get("DINOV2_WORK_POOLS", f"{LOCAL_POOL},{CLUSTER_POOL}").split(",") if p)
        if not pools:
            raise ServiceError("DINOV2_WORK_POOLS names no work pool")
        return cls(
            host=os.environ.get("DINOV2_SERVICES_HOST", "127.0.0.1"),
            prefect_port=port("DINOV2_PREFECT_PORT", 4200),
            mlflow_port=port("DINOV2_MLFLOW_PORT", 5000),
            state_dir=Path(os.environ.get("DINOV2_SERVICES_DIR", REPOSITORY / "outputs" / "services")).resolve(),
            pools=pools,
        )

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def prefect_ui_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def client_environment(self) -> dict[str, str]:
        """What a shell, a worker and the flow runs it starts need to reach these services."""
        return {"PREFECT_API_URL": self.prefect_api_url, "MLFLOW_TRACKING_URI": self.mlflow_url}


@dataclass(frozen=True)
class Service:
    name: str
    command: list[str]
    environment: dict[str, str]


def _program(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def server_services(settings: ServiceSettings) -> list[Service]:
    prefect_home = settings.state_dir / "prefect"
    mlflow_dir = settings.state_dir / "mlflow"
    prefect = Service(
        "prefect-server",
        [_program("prefect"), "server", "start", "--host", settings.host, "--port", str(settings.prefect_port)],
        # The UI asks its API at 127.0.0.1:4200 unless told this server's address (a --port alone does not).
        {"PREFECT_HOME": str(prefect_home), "PREFECT_UI_API_URL": settings.prefect_api_url},
    )
    mlflow = Service(
        "mlflow-server",
        [
            _program("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(mlflow_dir / "artifacts"),
            "--host",
            settings.host,
            "--port",
            str(settings.mlflow_port),
            "--workers",
            "1",
        ],  # fmt: skip
        # MLflow 3 otherwise starts background job consumers (dozens of processes) that nothing here uses.
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    return [prefect, mlflow]


def worker_services(settings: ServiceSettings) -> list[Service]:
    return [
        Service(
            f"worker-{pool}",
            [_program("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-worker"],
            {"PREFECT_HOME": str(settings.state_dir / "prefect"), **settings.client_environment},
        )
        for pool in settings.pools
    ]


def _pid_file(settings: ServiceSettings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.json"


def _command_line(pid: int) -> str | None:
    """The running command of ``pid``, or None when no such process exists."""
    try:
        result = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def running_pid(settings: ServiceSettings, service: Service) -> int | None:
    """The pid recorded for ``service`` if that process is still the one we started (pids get reused)."""
    path = _pid_file(settings, service.name)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    command = _command_line(record["pid"])
    if command is None or Path(record["command"][0]).name not in command:
        return None
    return record["pid"]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _start(settings: ServiceSettings, service: Service) -> subprocess.Popen:
    logs = settings.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, **QUIET, **service.environment}
    with open(logs / f"{service.name}.log", "ab") as log:
        # Its own session, so stopping it stops everything it started (the server's own sub-processes).
        process = subprocess.Popen(
            service.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=environment, cwd=REPOSITORY,
        )  # fmt: skip
    record = _pid_file(settings, service.name)
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": process.pid, "command": service.command}))
    os.replace(partial, record)
    return process


def _log_tail(settings: ServiceSettings, name: str, lines: int = 15) -> str:
    path = settings.state_dir / "logs" / f"{name}.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _http_ok(url: str, data: bytes | None = None) -> bytes | None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.read()
    except (OSError, urllib.error.URLError):
        return None


def health_url(settings: ServiceSettings, service: Service) -> str:
    if service.name == "prefect-server":
        return f"{settings.prefect_api_url}/health"
    return f"{settings.mlflow_url}/health"


def _worker_heartbeat_since(settings: ServiceSettings, pool: str, since: datetime) -> bool:
    body = _http_ok(f"{settings.prefect_api_url}/work_pools/{pool}/workers/filter", data=b"{}")
    if body is None:
        return False
    for worker in json.loads(body):
        beat = worker.get("last_heartbeat_time")
        if worker["name"] == f"{pool}-worker" and beat and datetime.fromisoformat(beat) >= since:
            return True
    return False


def _wait(settings: ServiceSettings, pending: dict[str, tuple[subprocess.Popen, Callable[[], bool]]]) -> None:
    """Wait until every ``ready()`` check passes; fail as soon as one of the processes exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while pending:
        for name, (process, ready) in list(pending.items()):
            if process.poll() is not None:
                raise ServiceError(
                    f"{name} exited with code {process.returncode} while starting; its log "
                    f"({settings.state_dir / 'logs' / (name + '.log')}) ends with:\n{_log_tail(settings, name)}"
                )
            if ready():
                pending.pop(name)
        if pending and time.monotonic() > deadline:
            raise ServiceError(
                f"{', '.join(pending)} not ready after {STARTUP_TIMEOUT_S:.0f} s; logs in {settings.state_dir / 'logs'}"
            )
        if pending:
            time.sleep(0.5)


def up(settings: ServiceSettings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    servers = server_services(settings)
    pending = {}
    for service in servers:
        url = health_url(settings, service)
        if running_pid(settings, service) is not None:
            print(f"{service.name} already running")
        else:
            port = settings.prefect_port if service.name == "prefect-server" else settings.mlflow_port
            if _port_in_use(settings.host, port):
                raise ServiceError(
                    f"{settings.host}:{port} is in use by another process; stop it or choose another port "
                    f"({'DINOV2_PREFECT_PORT' if service.name == 'prefect-server' else 'DINOV2_MLFLOW_PORT'})"
                )
            process = _start(settings, service)
            pending[service.name] = (process, lambda url=url: _http_ok(url) is not None)
    _wait(settings, pending)

    pending = {}
    for service, pool in zip(worker_services(settings), settings.pools, strict=True):
        if running_pid(settings, service) is not None:
            print(f"{service.name} already running")
            continue
        started = datetime.now(timezone.utc)
        process = _start(settings, service)
        pending[service.name] = (
            process,
            lambda pool=pool, started=started: _worker_heartbeat_since(settings, pool, started),
        )
    _wait(settings, pending)

    environment = settings.client_environment
    (settings.state_dir / "env").write_text("".join(f"export {key}={value}\n" for key, value in environment.items()))
    print(f"Prefect UI  {settings.prefect_ui_url}  (workers on pools: {', '.join(settings.pools)})")
    print(f"MLflow UI   {settings.mlflow_url}")
    print(f"point a shell at them:  source {settings.state_dir / 'env'}")


def _stop(settings: ServiceSettings, services: list[Service], signals: tuple[int, ...], timeout: float) -> None:
    """Signal each service's process group (all at once), signal again after a few seconds where one is
    still running (a worker stops promptly on its second SIGINT), and SIGKILL what is left at ``timeout``."""
    groups = {service.name: running_pid(settings, service) for service in services}
    groups = {name: pid for name, pid in groups.items() if pid is not None}
    # A worker starts each flow run in a session of its own; stop those too, should the worker not.
    for name, pid in list(groups.items()):
        for child_group in _child_groups(pid):
            groups[f"{name} flow run {child_group}"] = child_group
    deadline = time.monotonic() + timeout
    for number, signal_number in enumerate(signals):
        for pid in groups.values():
            if _group_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal_number)
        wait_until = deadline if number == len(signals) - 1 else min(deadline, time.monotonic() + 5)
        while time.monotonic() < wait_until and any(_group_alive(pid) for pid in groups.values()):
            time.sleep(0.2)
    for name, pid in groups.items():
        if _group_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        print(f"{name} stopped")
    for service in services:
        _pid_file(settings, service.name).unlink(missing_ok=True)


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process."""
    result = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True, timeout=10)
    rows = [line.split() for line in result.stdout.splitlines()]
    return [(int(pid), int(ppid), int(pgid), state) for pid, ppid, pgid, state in rows]


def _child_groups(pid: int) -> set[int]:
    """Process groups of ``pid``'s children that are not its own group."""
    return {pgid for _, ppid, pgid, _ in _processes() if ppid == pid and pgid != pid}


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for a parent to reap them do not count)."""
    return any(group == pgid and not state.startswith("Z") for _, _, group, state in _processes())


def down(settings: ServiceSettings) -> None:
    _stop(settings, worker_services(settings), (signal.SIGINT, signal.SIGINT), WORKER_STOP_TIMEOUT_S)
    _stop(settings, server_services(settings), (signal.SIGTERM,), SERVER_STOP_TIMEOUT_S)


def status(settings: ServiceSettings) -> bool:
    """Print one line per service; True when every one is running and healthy."""
    healthy = True
    for service in server_services(settings):
        pid = running_pid(settings, service)
        ok = pid is not None and _http_ok(health_url(settings, service)) is not None
        healthy &= ok
        state = "healthy" if ok else "stopped" if pid is None else "not answering"
        print(f"{service.name:18} {state:14} {health_url(settings, service)}")
    for service in worker_services(settings):
        pid = running_pid(settings, service)
        healthy &= pid is not None
        print(f"{service.name:18} {'running' if pid else 'stopped'}")
    return healthy


def check_reachable(name: str, variable: str, url: str, health_url: str) -> None:
    """Raise a one-line ServiceError naming ``url`` when its health endpoint does not answer."""
    try:
        with urllib.request.urlopen(health_url, timeout=5):
            return
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} from {health_url}"
    except (OSError, urllib.error.URLError) as error:
        reason = str(getattr(error, "reason", error))
    raise ServiceError(f"{name} at {url} ({variable}) is unreachable: {reason}")


def check_tracking_server() -> None:
    """The MLflow server named by MLFLOW_TRACKING_URI answers (a local SQLite store needs no check)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        check_reachable("MLflow tracking server", "MLFLOW_TRACKING_URI", uri, f"{uri.rstrip('/')}/health")


def check_prefect_api() -> None:
    """The Prefect API named by PREFECT_API_URL (environment or profile) answers; unset, Prefect starts its own."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        check_reachable("Prefect API", "PREFECT_API_URL", url, f"{url.rstrip('/')}/health")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.services", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    action = parser.parse_args(argv).action
    try:
        settings = ServiceSettings.from_environment()
        if action == "up":
            up(settings)
        elif action == "down":
            down(settings)
        elif not status(settings):
            sys.exit(1)
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
