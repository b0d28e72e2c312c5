"""Local services for one person under supervisord: a Prefect server, a Prefect worker per work pool, an MLflow server.

``python -m flows.services up|down|status`` (what ``make up`` / ``make down`` / ``make status`` run). supervisord
starts, stops and restarts the programs; this module writes its configuration from ``ServiceSettings`` (the
``DINOV2_*`` variables), starts it, and checks what supervisord cannot see: that the servers answer their health
endpoints and that each worker has sent the Prefect server a heartbeat. Everything lives in one folder
(``outputs/services/`` unless ``DINOV2_SERVICES_DIR`` says otherwise):

    supervisord.conf  the programs: command, environment, stop signal (``supervisorctl -c`` it to look inside)
    prefect/          PREFECT_HOME of the server and the workers (SQLite database, local result storage)
    mlflow/           mlflow.db (SQLite backend store) and artifacts/ (served through the MLflow server)
    logs/<name>.log   each program's output; supervisord.log is supervisord's own
    pids/<name>.json  each program's process id as ``up`` left it (``supervisorctl pid NAME`` has the current one)
    env               ``export`` lines pointing a shell at these services

``up`` starts the servers, then (once they are healthy) the workers, and returns when everything is healthy; it
refuses a server port that another process holds. ``down`` stops the workers (SIGINT, on which a worker ends its
flow runs; on SIGTERM it lingers), makes sure those flow runs are gone (each runs in a session of its own, out of
reach of a stop by process group), then stops the servers and supervisord. Both are idempotent.
"""

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dinov2.configuration import ConfigError
from dinov2.configuration.settings import ServiceSettings, Settings

REPOSITORY = Path(__file__).resolve().parents[1]
MLFLOW_SERVER_SCRIPT = REPOSITORY / "infra" / "services" / "mlflow-server.sh"
STARTUP_TIMEOUT_S = 120.0
FLOW_RUN_STOP_TIMEOUT_S = 10.0
# No telemetry from the services or from the flow runs they start.
QUIET = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
WORKER_PREFIX = "worker-"  # a worker program's name: worker-<pool>
UNIX_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS


class ServiceError(RuntimeError):
    """A service could not be started or reached; the message is one line for the user (a log tail may follow)."""


@dataclass(frozen=True)
class Program:
    """One supervisord program: how it runs and stops, and how this module knows it is healthy."""

    name: str
    command: list[str]
    environment: dict[str, str]
    stop_signal: str  # supervisord sends it to the program's process group, then SIGKILL after stop_wait_s
    stop_wait_s: int
    priority: int  # supervisord stops higher priorities first
    health_url: str | None = None  # a server: answers here once it serves
    port: int | None = None
    port_variable: str | None = None
    pool: str | None = None  # a worker: its work pool

    def section(self, settings: ServiceSettings) -> str:
        environment = ",".join(f'{key}="{_escape(value)}"' for key, value in self.environment.items())
        options = {
            "command": _escape(shlex.join(self.command)),
            "directory": _escape(str(REPOSITORY)),
            "environment": environment,
            "priority": self.priority,
            # started by `up` in order (servers healthy before the workers), never by supervisord on its own
            "autostart": "false",
            "autorestart": "true",
            "startsecs": 1,
            "startretries": 3,
            "stopsignal": self.stop_signal,
            "stopwaitsecs": self.stop_wait_s,
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": _escape(str(_log(settings, self.name))),
            "stdout_logfile_maxbytes": "50MB",
            "stdout_logfile_backups": 3,
        }
        return f"[program:{self.name}]\n" + "".join(f"{key}={value}\n" for key, value in options.items())


def _escape(value: str) -> str:
    """A literal value in supervisord's configuration, which expands ``%(name)s``."""
    return value.replace("%", "%%")


def _executable(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def mlflow_server_program(backend_store_uri: str, artifacts_destination: str, host: str, port: int) -> Program:
    """The project's MLflow server: infra/services/mlflow-server.sh (the compose service runs the same script),
    with this interpreter's ``mlflow``."""
    return Program(
        "mlflow-server",
        ["sh", str(MLFLOW_SERVER_SCRIPT), "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port)],
        {"MLFLOW_EXECUTABLE": _executable("mlflow")},
        stop_signal="TERM", stop_wait_s=20, priority=100,
        health_url=f"http://{host}:{port}/health", port=port, port_variable="DINOV2_MLFLOW_PORT",
    )  # fmt: skip


def programs(settings: ServiceSettings) -> list[Program]:
    """Every program, in the order ``up`` starts them (servers, then workers)."""
    prefect_home = str(settings.state_dir / "prefect")
    mlflow_dir = settings.state_dir / "mlflow"
    host = settings.services_host
    servers = [
        Program(
            "prefect-server",
            [_executable("prefect"), "server", "start", "--host", host, "--port", str(settings.prefect_port)],
            # The UI asks its API at 127.0.0.1:4200 unless told this server's address (a --port alone does not).
            {"PREFECT_HOME": prefect_home, "PREFECT_UI_API_URL": settings.prefect_api_url},
            stop_signal="TERM", stop_wait_s=20, priority=100,
            health_url=f"{settings.prefect_api_url}/health", port=settings.prefect_port,
            port_variable="DINOV2_PREFECT_PORT",
        ),
        mlflow_server_program(
            f"sqlite:///{mlflow_dir / 'mlflow.db'}", str(mlflow_dir / "artifacts"), host, settings.mlflow_port
        ),
    ]  # fmt: skip
    workers = [
        Program(
            f"{WORKER_PREFIX}{pool}",
            [_executable("prefect"), "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"{pool}-worker"],
            {"PREFECT_HOME": prefect_home, **settings.client_environment},
            # a worker stops at once on SIGINT and ends its flow runs (on SIGTERM it lingers)
            stop_signal="INT", stop_wait_s=30, priority=200, pool=pool,
        )
        for pool in settings.pools
    ]  # fmt: skip
    return servers + workers


def _socket(settings: ServiceSettings) -> Path:
    return settings.state_dir / "supervisor.sock"


def _config_path(settings: ServiceSettings) -> Path:
    return settings.state_dir / "supervisord.conf"


def _log(settings: ServiceSettings, name: str) -> Path:
    return settings.state_dir / "logs" / f"{name}.log"


def supervisord_config(settings: ServiceSettings) -> str:
    """The whole supervisord configuration: supervisord itself, its control socket, and every program."""
    state = settings.state_dir
    environment = ",".join(f'{key}="{value}"' for key, value in QUIET.items())
    head = f"""\
; Written by `python -m flows.services up` from the DINOV2_* settings; rewritten on the next `up`.
; supervisorctl -c {_escape(str(_config_path(settings)))} status
[supervisord]
logfile={_escape(str(_log(settings, "supervisord")))}
pidfile={_escape(str(state / "supervisord.pid"))}
directory={_escape(str(state))}
identifier=dinov2-services
environment={environment}

[unix_http_server]
file={_escape(str(_socket(settings)))}
chmod=0700

[supervisorctl]
serverurl=unix://{_escape(str(_socket(settings)))}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
"""
    return "\n".join([head, *(program.section(settings) for program in programs(settings))])


@dataclass
class Supervisor:
    """supervisord's XML-RPC interface on its unix socket (what supervisorctl talks to)."""

    settings: ServiceSettings
    proxy: xmlrpc.client.ServerProxy = field(init=False)

    def __post_init__(self) -> None:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{_socket(self.settings)}")
        self.proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def running(self) -> bool:
        """Whether supervisord answers on its socket."""
        if not _socket(self.settings).exists():
            return False
        try:
            return self.proxy.supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault):
            return False

    def processes(self) -> dict[str, dict]:
        """name -> supervisord's process info (statename, pid, ...); empty when supervisord is not running."""
        if not self.running():
            return {}
        return {info["name"]: info for info in self.proxy.supervisor.getAllProcessInfo()}

    def start(self, name: str) -> dict:
        with contextlib.suppress(xmlrpc.client.Fault):  # ALREADY_STARTED
            self.proxy.supervisor.startProcess(name, False)
        return self.proxy.supervisor.getProcessInfo(name)

    def stop(self, names: list[str]) -> None:
        """Stop the programs together (each gets its stop signal) and wait until supervisord has them stopped."""
        for name in names:
            with contextlib.suppress(xmlrpc.client.Fault):  # NOT_RUNNING
                self.proxy.supervisor.stopProcess(name, False)
        while any(self.proxy.supervisor.getProcessInfo(name)["statename"] == "STOPPING" for name in names):
            time.sleep(0.2)

    def pid(self) -> int:
        return self.proxy.supervisor.getPID()


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def _log_tail(settings: ServiceSettings, name: str, lines: int = 15) -> str:
    path = _log(settings, name)
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _failure(settings: ServiceSettings, name: str, what: str) -> ServiceError:
    return ServiceError(f"{name} {what}; its log ({_log(settings, name)}) ends with:\n{_log_tail(settings, name)}")


def _http_ok(url: str, data: bytes | None = None) -> bytes | None:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return response.read()
    except (OSError, urllib.error.URLError):
        return None


def _workers(settings: ServiceSettings, pool: str) -> list[dict]:
    """The Prefect server's records of the workers on ``pool`` (empty when it does not answer)."""
    body = _http_ok(f"{settings.prefect_api_url}/work_pools/{pool}/workers/filter", data=b"{}")
    return json.loads(body) if body else []


def _heartbeat_since(settings: ServiceSettings, program: Program, since: datetime) -> bool:
    for worker in _workers(settings, program.pool or ""):
        beat = worker.get("last_heartbeat_time")
        if worker["name"] == f"{program.pool}-worker" and beat and datetime.fromisoformat(beat) >= since:
            return True
    return False


def _ready(settings: ServiceSettings, program: Program, since: datetime) -> bool:
    if program.health_url:
        return _http_ok(program.health_url) is not None
    return _heartbeat_since(settings, program, since)


def _start_and_wait(settings: ServiceSettings, supervisor: Supervisor, batch: list[Program]) -> None:
    """Start ``batch`` together and wait until each is ready; a program that exits meanwhile is stopped (not left
    to supervisord's restarts) and reported with the end of its log."""
    started = datetime.now(timezone.utc)
    pending = {program.name: (program, supervisor.start(program.name)["pid"]) for program in batch}
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while pending:
        for name, (program, pid) in list(pending.items()):
            info = supervisor.proxy.supervisor.getProcessInfo(name)
            if info["statename"] not in ("STARTING", "RUNNING") or (pid and info["pid"] != pid):
                supervisor.stop([name])
                raise _failure(settings, name, "exited while starting")
            pending[name] = (program, pid or info["pid"])
            if _ready(settings, program, started):
                pending.pop(name)
        if pending and time.monotonic() > deadline:
            name = next(iter(pending))
            raise _failure(settings, name, f"not ready after {STARTUP_TIMEOUT_S:.0f} s")
        if pending:
            time.sleep(0.5)


def _start_supervisord(settings: ServiceSettings, supervisor: Supervisor) -> None:
    if len(str(_socket(settings))) > UNIX_SOCKET_PATH_MAX:
        raise ServiceError(f"{settings.state_dir} is too long a path for a unix socket; choose a shorter one")
    # supervisord forks itself into the background (its own session) and this call returns
    launched = subprocess.run(
        [_executable("supervisord"), "-c", str(_config_path(settings))],
        cwd=settings.state_dir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if launched.returncode != 0:
        raise ServiceError(f"supervisord did not start: {' '.join((launched.stderr or launched.stdout).split())}")
    deadline = time.monotonic() + 30
    while not supervisor.running():
        if time.monotonic() > deadline:
            raise _failure(settings, "supervisord", "does not answer on its socket")
        time.sleep(0.2)


def up(settings: ServiceSettings) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "logs").mkdir(exist_ok=True)
    supervisor = Supervisor(settings)
    config, config_path = supervisord_config(settings), _config_path(settings)
    running = supervisor.processes()
    if running and config_path.is_file() and config_path.read_text() != config:
        raise ServiceError(
            f"the services in {settings.state_dir} run with other settings; "
            "stop them first (python -m flows.services down)"
        )
    everything = programs(settings)
    to_start = [program for program in everything if running.get(program.name, {}).get("statename") != "RUNNING"]
    for program in everything:
        if program not in to_start:
            print(f"{program.name} already running")
    for program in to_start:
        if program.port is not None and _port_in_use(settings.services_host, program.port):
            raise ServiceError(
                f"{settings.services_host}:{program.port} is in use by another process; stop it or choose another "
                f"port ({program.port_variable})"
            )
    if not running:
        config_path.write_text(config)
        _start_supervisord(settings, supervisor)
    _start_and_wait(settings, supervisor, [program for program in to_start if program.pool is None])
    _start_and_wait(settings, supervisor, [program for program in to_start if program.pool is not None])

    pids = settings.state_dir / "pids"
    pids.mkdir(exist_ok=True)
    for program in everything:
        record = {"pid": supervisor.proxy.supervisor.getProcessInfo(program.name)["pid"], "command": program.command}
        (pids / f"{program.name}.json").write_text(json.dumps(record))
    environment = settings.client_environment
    (settings.state_dir / "env").write_text("".join(f"export {key}={value}\n" for key, value in environment.items()))
    print(f"Prefect UI  {settings.prefect_ui_url}  (workers on pools: {', '.join(settings.pools)})")
    print(f"MLflow UI   {settings.mlflow_url}")
    print(f"point a shell at them:  source {settings.state_dir / 'env'}")


def _processes() -> list[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process."""
    result = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True, timeout=10)
    rows = [line.split() for line in result.stdout.splitlines()]
    return [(int(pid), int(ppid), int(pgid), state) for pid, ppid, pgid, state in rows]


def flow_run_groups(worker_pid: int) -> set[int]:
    """Process groups of a worker's children outside its own group: the flow runs it started."""
    if worker_pid <= 1:
        return set()
    return {pgid for _, ppid, pgid, _ in _processes() if ppid == worker_pid and pgid not in (worker_pid, 0, 1)}


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for a parent to reap them do not count)."""
    return any(group == pgid and not state.startswith("Z") for _, _, group, state in _processes())


def _end_groups(groups: set[int], timeout: float) -> None:
    """SIGTERM each process group that still runs, SIGKILL what is left at ``timeout``."""
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pgid in groups:
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, number)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_group_alive(pgid) for pgid in groups):
            time.sleep(0.2)


def down(settings: ServiceSettings) -> None:
    supervisor = Supervisor(settings)
    running = supervisor.processes()
    if not running:
        return
    # what this supervisord runs, whatever the settings say now; in the order of `programs`
    known = [program.name for program in programs(settings)]
    names = sorted(running, key=lambda name: (known.index(name) if name in known else len(known), name))
    alive = [name for name in names if running[name]["statename"] in ("STARTING", "RUNNING", "BACKOFF")]
    workers = [name for name in alive if name.startswith(WORKER_PREFIX)]
    # A worker starts each flow run in a session of its own, out of reach of the stop by process group. On SIGINT
    # it ends them itself; these are ended here should it not (killed at the end of its stop wait, say).
    flow_runs = {pgid for name in workers for pgid in flow_run_groups(running[name]["pid"])}
    supervisor.stop(workers)
    for name in workers:
        print(f"{name} stopped")
    _end_groups(flow_runs, FLOW_RUN_STOP_TIMEOUT_S)
    servers = [name for name in alive if name not in workers]
    supervisor.stop(servers)
    for name in servers:
        print(f"{name} stopped")
    supervisord_pid = supervisor.pid()
    supervisor.proxy.supervisor.shutdown()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _group_alive(supervisord_pid):  # supervisord leads its own group
        time.sleep(0.2)
    for name in names:
        (settings.state_dir / "pids" / f"{name}.json").unlink(missing_ok=True)


def status(settings: ServiceSettings) -> bool:
    """Print one line per program; True when every one is running and healthy."""
    running = Supervisor(settings).processes()
    healthy = True
    for program in programs(settings):
        state = running.get(program.name, {}).get("statename", "STOPPED")
        if state != "RUNNING":
            line = state.lower()
        elif program.health_url:
            line = "healthy" if _http_ok(program.health_url) is not None else "not answering"
        else:
            online = any(
                worker["name"] == f"{program.pool}-worker" and worker.get("status") == "ONLINE"
                for worker in _workers(settings, program.pool or "")
            )
            line = "healthy" if online else "no heartbeat"
        healthy &= line == "healthy"
        print(f"{program.name:18} {line:14} {program.health_url or f'pool {program.pool}'}")
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
    uri = Settings.read().mlflow_tracking_uri or ""
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
        settings = ServiceSettings.read()
        if action == "up":
            up(settings)
        elif action == "down":
            down(settings)
        elif not status(settings):
            sys.exit(1)
    except (ServiceError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
