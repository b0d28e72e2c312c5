"""How a pretraining run is launched on each kind of infrastructure, and how the flow waits for it.

Every launcher runs the same engine command on every rank, ``dinov2 pretrain --recipe ... --output ...``:

- ``local``: that command directly (one process), or under ``torchrun --standalone`` for several GPUs;
- ``deepspeed``: DeepSpeed's launcher, with a hostfile for several nodes;
- ``slurm``: ``sbatch`` of ``infra/slurm/pretrain.sbatch.j2`` (``srun`` + ``torchrun`` on every node,
  requeued on preemption), then ``sacct``/``squeue`` until the job ends;
- ``kubernetes``: ``kubectl apply`` of ``infra/kubernetes/pytorchjob.yaml.j2`` (a Kubeflow PyTorchJob),
  then ``kubectl get`` until it succeeds or fails.

A launch that fails is launched again with the same output folder, and the engine resumes from the
newest checkpoint in it.
"""

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
from pydantic import Field

from dinov2.atomic import write_atomically
from dinov2.configuration import Section
from flows.stages import StageFailed, run_command

REPOSITORY = Path(__file__).resolve().parents[1]
INFRA = REPOSITORY / "infra"
Launcher = Literal["local", "deepspeed", "slurm", "kubernetes"]
SLURM_TEMPLATE = "slurm/pretrain.sbatch.j2"
PYTORCHJOB_TEMPLATE = "kubernetes/pytorchjob.yaml.j2"


class ClusterSettings(Section):
    """Where a cluster launch goes; a deployment states only what differs from these defaults."""

    partition: str | None = Field(None, description="Slurm partition (sbatch --partition)")
    account: str | None = Field(None, description="Slurm account (sbatch --account)")
    time_limit: str = Field("48:00:00", description="Slurm time limit of one allocation; the job requeues itself")
    cpus_per_gpu: int = Field(8, gt=0, description="CPU cores per GPU for the data loaders")
    image: str = Field("dinov2-mlops:latest", description="training image (infra/Dockerfile) for Kubernetes")
    namespace: str = "default"
    volume_claim: str = Field("dinov2", description="PersistentVolumeClaim holding data and run folders")
    mount_path: str = Field("/mnt/dinov2", description="where the claim is mounted in the pods")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile (infra/deepspeed/hostfile.example)")
    master_port: int = Field(29500, gt=0, lt=65536)
    poll_seconds: float = Field(30.0, gt=0, description="how often the flow asks the scheduler about the job")


@dataclass(frozen=True)
class LaunchPlan:
    """What the flow runs on its worker's machine (``command``), what every rank runs (``engine_command``)
    and the files ``command`` needs, rendered from the templates in infra/ (name -> text)."""

    launcher: str
    command: list[str]
    engine_command: list[str]
    files: dict[str, str] = field(default_factory=dict)
    job_name: str = ""
    warnings: list[str] = field(default_factory=list)  # what the ranks will miss, said before the launch


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def unreachable_tracking(uri: str) -> str | None:
    """Why ranks on other machines cannot log to the MLflow tracking ``uri`` (this machine's loopback address or
    a local file store), or None when they may."""
    from urllib.parse import urlparse

    if not uri:
        return None  # tracking is off
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https") and (parsed.hostname or "") not in LOOPBACK_HOSTS:
        return None
    if parsed.scheme in ("http", "https"):
        where = f"{parsed.hostname}, this machine's loopback address"
    else:
        where = "a store on this machine's file system"
    return (
        f"MLFLOW_TRACKING_URI {uri} is {where}: the compute nodes cannot reach it and the run will not be tracked; "
        "set it to a server the nodes reach (http://<host>:5000)"
    )


def training_arguments(command: list[str], data: str | None, output: str, overrides: list[str]) -> list[str]:
    """The ``dinov2`` arguments of a training run (``command``: the subcommand and its own options), the
    same on every launcher and every rank."""
    arguments = list(command)
    if data:
        arguments += ["--data", data]
    arguments += ["--output", output]
    for override in overrides:
        arguments += ["--set", override]
    return arguments


def recipe_arguments(recipe: str | None) -> list[str]:
    """``--recipe NAME``, or, without a name, the recipe and changes of the checkout's params.yaml."""
    return ["--recipe", recipe] if recipe else ["--params", "params.yaml"]


def pretrain_arguments(recipe: str | None, data: str | None, output: str, overrides: list[str]) -> list[str]:
    return training_arguments(["pretrain", *recipe_arguments(recipe)], data, output, overrides)


def job_name(recipe: str | None, flow_run_id: str | None) -> str:
    """A Slurm / Kubernetes job name: lowercase, dashes, at most 63 characters, stable over retries."""
    suffix = (flow_run_id or "manual")[:8]
    name = "".join(c if c.isalnum() else "-" for c in f"dinov2-{recipe or 'params'}-{suffix}".lower())
    return name[:63].strip("-")


def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(INFRA), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    environment.filters["shell"] = lambda value: shlex.join(value) if isinstance(value, list) else shlex.quote(value)
    environment.filters["tojson"] = json.dumps
    return environment


def render(template: str, **values) -> str:
    return _templates().get_template(template).render(**values)


def launch_plan(
    launcher: Launcher,
    arguments: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    cluster: ClusterSettings,
    name: str,
    environment: dict[str, str],
) -> LaunchPlan:
    """The launch of ``dinov2 <arguments>`` on ``nodes`` x ``gpus_per_node`` ranks. ``environment`` is what
    the ranks must see that a scheduler does not pass on by itself (MLflow URI, Prefect flow-run id)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes ({nodes}) and gpus_per_node ({gpus_per_node}) must be at least 1")
    if launcher == "local":
        if nodes != 1:
            raise ValueError(f"the local launcher runs on one node, not {nodes}: use deepspeed, slurm or kubernetes")
        if gpus_per_node == 1:
            command = [sys.executable, "-m", "dinov2", *arguments]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc_per_node", str(gpus_per_node), "-m", "dinov2", *arguments]
        return LaunchPlan(launcher, command, command)
    if launcher == "deepspeed":
        command = [str(Path(sys.executable).with_name("deepspeed"))]
        if nodes > 1:
            if not cluster.hostfile:
                raise ValueError(f"the deepspeed launcher needs cluster.hostfile for {nodes} nodes")
            command += ["--hostfile", cluster.hostfile, "--num_nodes", str(nodes)]
        command += ["--num_gpus", str(gpus_per_node), "--master_port", str(cluster.master_port)]
        command += ["--module", "dinov2", *arguments]
        return LaunchPlan(launcher, command, command)
    if launcher == "slurm":
        engine = ["-m", "dinov2", *arguments]
        script = render(
            SLURM_TEMPLATE, job_name=name, nodes=nodes, gpus_per_node=gpus_per_node, cluster=cluster,
            engine_arguments=engine, environment=environment,
        )  # fmt: skip
        command = ["sbatch", "--parsable", "pretrain.sbatch"]
        return LaunchPlan(launcher, command, engine, {"pretrain.sbatch": script}, name, _remote_warnings(environment))
    if launcher == "kubernetes":
        engine = ["-m", "dinov2", *arguments]
        manifest = render(
            PYTORCHJOB_TEMPLATE, job_name=name, nodes=nodes, gpus_per_node=gpus_per_node, cluster=cluster,
            engine_arguments=engine, environment=environment,
        )  # fmt: skip
        command = ["kubectl", "apply", "--namespace", cluster.namespace, "-f", "pytorchjob.yaml"]
        return LaunchPlan(launcher, command, engine, {"pytorchjob.yaml": manifest}, name, _remote_warnings(environment))
    raise ValueError(f"unknown launcher {launcher!r}; expected local, deepspeed, slurm or kubernetes")


def _remote_warnings(environment: dict[str, str]) -> list[str]:
    problem = unreachable_tracking(environment.get("MLFLOW_TRACKING_URI", ""))
    return [problem] if problem else []


def write_files(plan: LaunchPlan, folder: Path) -> None:
    for name, text in plan.files.items():
        write_atomically(folder / name, lambda partial, text=text: partial.write_text(text))


def _capture(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise StageFailed("pretrain", command, 127, [f"error: {command[0]} is not on PATH of this worker"]) from None
    if result.returncode != 0:
        raise StageFailed("pretrain", command, result.returncode, (result.stdout + result.stderr).splitlines()[-20:])
    return result.stdout.strip()


# sacct states after which a Slurm job no longer runs; PREEMPTED and REQUEUED are not among them: the
# script requeues itself and the job comes back under the same id.
SLURM_FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


def slurm_state(job_id: str) -> tuple[str, int]:
    """(state, exit code) of a job: sacct when accounting knows it, else squeue while it is queued."""
    line = _capture(["sacct", "-j", job_id, "-X", "--noheader", "--parsable2", "--format=State,ExitCode"])
    if line:
        state, exit_code = line.splitlines()[0].split("|")
        code, _, signal_number = exit_code.partition(":")
        return state.split()[0], int(code) or -int(signal_number or 0)
    queued = _capture(["squeue", "-j", job_id, "--noheader", "--format=%T"])
    return (queued.split()[0] if queued else "PENDING"), 0


def run_slurm_job(plan: LaunchPlan, folder: Path, cluster: ClusterSettings, log) -> None:
    """Submit the sbatch script and wait until the job ends; a failed job raises StageFailed."""
    write_files(plan, folder)
    job_id = _capture(["sbatch", "--parsable", str(folder / "pretrain.sbatch")]).split(";")[0]
    log.info("submitted Slurm job %s (%s)", job_id, plan.job_name)
    state = ""
    try:
        while True:
            current, exit_code = slurm_state(job_id)
            if current != state:
                log.info("Slurm job %s: %s", job_id, current)
                state = current
            if current in SLURM_FINAL_STATES:
                break
            time.sleep(cluster.poll_seconds)
    except BaseException:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        raise
    if state != "COMPLETED":
        submitted = ["sbatch", str(folder / "pretrain.sbatch")]
        raise StageFailed("pretrain", submitted, exit_code or 1, [f"Slurm job {job_id} ended {state}"])


def run_pytorchjob(plan: LaunchPlan, folder: Path, cluster: ClusterSettings, log) -> None:
    """Apply the PyTorchJob (replacing one left by an earlier try) and wait until it succeeds or fails."""
    write_files(plan, folder)
    kubectl = ["kubectl", "--namespace", cluster.namespace]
    _capture([*kubectl, "delete", "pytorchjob", plan.job_name, "--ignore-not-found", "--wait=true"])
    run_command("pretrain", [*kubectl, "apply", "-f", str(folder / "pytorchjob.yaml")])
    condition = ""
    try:
        while condition not in ("Succeeded", "Failed"):
            time.sleep(cluster.poll_seconds)
            current = _capture(
                [*kubectl, "get", "pytorchjob", plan.job_name, "-o", "jsonpath={.status.conditions[-1].type}"]
            )
            if current != condition:
                log.info("PyTorchJob %s: %s", plan.job_name, current or "Pending")
                condition = current
    except BaseException:
        subprocess.run([*kubectl, "delete", "pytorchjob", plan.job_name], capture_output=True, timeout=120)
        raise
    if condition == "Failed":
        master_logs = subprocess.run(
            [*kubectl, "logs", "--tail=20", "-l", f"training.kubeflow.org/job-name={plan.job_name},"
             "training.kubeflow.org/replica-type=master"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        raise StageFailed("pretrain", plan.command, 1, master_logs.stdout.splitlines())
