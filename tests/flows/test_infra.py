"""The infrastructure templates: they parse, they render with a deployment's parameters, and the engine
accepts the command they launch (its dry run exits 0)."""

import json
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import ValidationError

from flows.launchers import ClusterSettings, launch_plan, pretrain_arguments

REPOSITORY = Path(__file__).resolve().parents[2]
INFRA = REPOSITORY / "infra"
ENVIRONMENT = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PREFECT__FLOW_RUN_ID": "0123abcd-flow-run"}


def deployment(name: str) -> dict:
    config = yaml.safe_load((REPOSITORY / "prefect.yaml").read_text())
    flow_name, deployment_name = name.split("/")
    for entry in config["deployments"]:
        if entry["entrypoint"].endswith(f":{flow_name}") and entry["name"] == deployment_name:
            return entry["parameters"]
    raise KeyError(name)


def rendered_launch(name: str):
    parameters = deployment(name)
    arguments = pretrain_arguments(
        parameters["recipe"], parameters.get("data"), parameters["output"], parameters.get("overrides", [])
    )
    return launch_plan(
        parameters["launcher"], arguments, nodes=parameters.get("nodes", 1),
        gpus_per_node=parameters.get("gpus_per_node", 1), cluster=ClusterSettings(**parameters.get("cluster", {})),
        name="dinov2-test-0123abcd", environment=ENVIRONMENT,
    )  # fmt: skip


def engine_arguments_after_module(command: list[str]) -> list[str]:
    """What follows ``-m dinov2`` (or ``--module dinov2``) in a launch command."""
    for flag in ("-m", "--module"):
        for index in range(len(command) - 1):
            if command[index] == flag and command[index + 1] == "dinov2":
                return command[index + 2 :]
    raise AssertionError(f"no -m dinov2 in {command}")


def sbatch_launch_line(script: str) -> list[str]:
    joined = script.replace("\\\n", " ")
    (line,) = [line for line in joined.splitlines() if line.startswith("srun ")]
    words = shlex.split(line)
    assert words[-1] == "&"
    return words[:-1]


@pytest.fixture(scope="module")
def launched_dry_runs(start_dinov2) -> dict[str, tuple[list[str], subprocess.CompletedProcess]]:
    """The engine arguments each rendered launch of a deployment runs (taken from the rendered text), and
    the engine's dry run of them; they run side by side."""
    slurm_script = rendered_launch("pretrain/vitg").files["pretrain.sbatch"]
    job = yaml.safe_load(rendered_launch("pretrain/vitl").files["pytorchjob.yaml"])
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    commands = {
        "slurm": engine_arguments_after_module(sbatch_launch_line(slurm_script)),
        "kubernetes": engine_arguments_after_module(master["command"]),
        "local": engine_arguments_after_module(rendered_launch("pretrain/cpu").command),
    }
    # pretrain/vitg with ZeRO-3 and the optimizer state offloaded to CPU memory
    offload = ["--set", "deepspeed.zero_stage=3", "--set", "deepspeed.offload_optimizer=cpu"]
    commands["slurm offload"] = commands["slurm"] + offload
    started = {
        key: start_dinov2(*arguments, "--dry-run", "--json", cwd=REPOSITORY) for key, arguments in commands.items()
    }
    finished = {}
    for key, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        finished[key] = (commands[key], subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return finished


def test_the_slurm_script_for_pretrain_vitg_is_valid_bash_and_requeues(tmp_path):
    launch = rendered_launch("pretrain/vitg")
    script = launch.files["pretrain.sbatch"]
    assert launch.command == ["sbatch", "--parsable", "pretrain.sbatch"]
    for directive in ("--nodes=32", "--gpus-per-node=8", "--ntasks-per-node=1", "--cpus-per-task=64", "--requeue",
                      "--partition=gpu", "--time=48:00:00", "--job-name=dinov2-test-0123abcd"):  # fmt: skip
        assert f"#SBATCH {directive}\n" in script
    assert "export PREFECT__FLOW_RUN_ID=0123abcd-flow-run\n" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    (tmp_path / "pretrain.sbatch").write_text(script)
    checked = subprocess.run(["bash", "-n", str(tmp_path / "pretrain.sbatch")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    words = sbatch_launch_line(script)
    assert words[:4] == ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes"]
    assert words[4:7] == ["32", "--nproc_per_node", "8"]


def test_the_pytorchjob_for_pretrain_vitl_has_one_master_and_seven_workers():
    launch = rendered_launch("pretrain/vitl")
    job = yaml.safe_load(launch.files["pytorchjob.yaml"])
    assert (job["apiVersion"], job["kind"], job["metadata"]["name"]) == (
        "kubeflow.org/v1", "PyTorchJob", "dinov2-test-0123abcd",
    )  # fmt: skip
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {role: spec["replicas"] for role, spec in replicas.items()} == {"Master": 1, "Worker": 7}
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["command"][:4] == ["torchrun", "--nnodes", "8", "--nproc_per_node"]
        assert {item["name"]: item["value"] for item in container["env"]} == ENVIRONMENT
        assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "dinov2"}
        assert container["volumeMounts"][0] == {"name": "dinov2", "mountPath": "/mnt/dinov2"}


def test_every_rendered_launch_command_is_accepted_by_the_engine(launched_dry_runs):
    recipes = {"slurm": "vitg14", "kubernetes": "vitl14", "local": "cpu_tiny"}
    for key, (arguments, result) in launched_dry_runs.items():
        if key == "slurm offload":
            continue
        assert arguments[:3] == ["pretrain", "--recipe", recipes[key]]
        assert result.returncode == 0, f"{key}: {result.stderr}"
        assert json.loads(result.stdout)["recipe"] == recipes[key]


def test_the_deepspeed_configs_are_what_the_engine_builds_for_vitg14_on_256_gpus(launched_dry_runs):
    # pretrain/vitg runs the recipe's ZeRO-2 on 256 GPUs; ZeRO-1 and ZeRO-3 differ from it in the stage only
    _, result = launched_dry_runs["slurm"]
    engine = json.loads(result.stdout)["deepspeed_config"]
    assert engine["zero_optimization"]["stage"] == 2
    for stage in (1, 2, 3):
        expected = {**engine, "zero_optimization": {**engine["zero_optimization"], "stage": stage}}
        assert json.loads((INFRA / "deepspeed" / f"zero{stage}.json").read_text()) == expected
    # deepspeed.offload_optimizer=cpu adds ZeRO's offload_optimizer section, and nothing else
    _, result = launched_dry_runs["slurm offload"]
    assert result.returncode == 0, result.stderr
    offloaded = json.loads(result.stdout)["deepspeed_config"]
    assert json.loads((INFRA / "deepspeed" / "zero3_offload.json").read_text()) == offloaded
    assert offloaded["zero_optimization"].pop("offload_optimizer") == {"device": "cpu", "pin_memory": True}
    assert offloaded == json.loads((INFRA / "deepspeed" / "zero3.json").read_text())


def test_the_hostfile_example_names_nodes_with_their_gpu_slots():
    lines = [
        line
        for line in (INFRA / "deepspeed" / "hostfile.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"[\w.-]+ slots=\d+", line) for line in lines)


def test_the_compose_services_reach_each_other_by_name_and_publish_ports_on_127_0_0_1_by_default():
    from flows.services import MLFLOW_SERVER_SCRIPT, mlflow_server_program

    services = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(port.startswith("${DINOV2_BIND:-127.0.0.1}:") for port in published)

    def listening_port(name: str) -> int:
        command = services[name]["command"]
        return int(command[command.index("--port") + 1])

    def served_by(url: str) -> str:
        """The service a URL of the file points at, checked to be one of the file at the port it listens on."""
        address = urlparse(url)
        assert address.hostname in services, url
        if "--port" in services[address.hostname].get("command", []):
            assert address.port == listening_port(address.hostname), url
        return address.hostname

    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
    worker = services["prefect-worker"]["environment"]
    assert served_by(worker["PREFECT_API_URL"]) == "prefect-server"
    assert served_by(worker["MLFLOW_TRACKING_URI"]) == "mlflow"
    prefect_database = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_database.startswith("postgresql+asyncpg://") and served_by(prefect_database) == "postgres"
    # the team's MLflow server is the one `make up` and the tests start (the same script, given the same options),
    # on Postgres with its artifacts in the bucket the `buckets` service creates
    mlflow_command = services["mlflow"]["command"]
    assert mlflow_command[:2] == ["sh", f"/opt/dinov2/{MLFLOW_SERVER_SCRIPT.relative_to(REPOSITORY)}"]
    local = mlflow_server_program("sqlite:///mlflow.db", "artifacts", "127.0.0.1", 5000).command
    assert {word for word in local if word.startswith("--")} <= set(mlflow_command)
    backend_store = mlflow_command[mlflow_command.index("--backend-store-uri") + 1]
    assert backend_store.startswith("postgresql://") and served_by(backend_store) == "postgres"
    artifacts = urlparse(mlflow_command[mlflow_command.index("--artifacts-destination") + 1])
    assert artifacts.scheme == "s3" and f"store/{artifacts.hostname}" in " ".join(services["buckets"]["command"])


def test_every_deployment_runs_a_flow_that_takes_its_parameters_on_a_pool_make_up_serves(
    declared_deployments, monkeypatch
):
    """prefect.yaml loads with Prefect's own parser; each entrypoint imports a flow that accepts the deployment's
    parameters; each deployment is on one of the shared pool definitions, with a worker from `make up`: the
    cluster pool for a launch that submits a job to a cluster (its launch plan writes a job file: an sbatch script,
    a PyTorchJob), the local pool for a run on the worker's machine."""
    from prefect.flows import Flow

    from dinov2.configuration.settings import ServiceSettings

    monkeypatch.delenv("DINOV2_WORK_POOLS", raising=False)
    served = ServiceSettings().pools
    defined = list(yaml.safe_load((REPOSITORY / "prefect.yaml").read_text())["definitions"]["work_pools"].values())
    names = [declared.name for declared in declared_deployments]
    assert names and len(set(names)) == len(names), names  # `prefect deployment run FLOW/NAME` names one each
    for declared in declared_deployments:
        assert isinstance(declared.flow, Flow), declared.name
        accepted = declared.flow.validate_parameters(declared.parameters)  # raises on a parameter it does not take
        assert declared.work_pool in defined and declared.work_pool["name"] in served, declared.name
        submits_a_job = "launcher" in accepted and bool(rendered_launch(declared.name).files)
        assert declared.work_pool["name"] == ("gpu-cluster" if submits_a_job else "local"), declared.name


def test_a_deployment_with_a_parameter_its_flow_does_not_take_is_refused(declared_deployments):
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    flow = next(declared for declared in declared_deployments if declared.name == "pretrain/cpu").flow
    with pytest.raises(SignatureMismatchError, match="nodse"):
        flow.validate_parameters({"recipe": "cpu_tiny", "nodse": 2})
    with pytest.raises(ParameterTypeError, match="nodes"):
        flow.validate_parameters({"recipe": "cpu_tiny", "nodes": "many"})


def test_bad_launch_settings_fail_before_anything_renders():
    with pytest.raises(ValidationError, match="partion"):
        ClusterSettings(partion="gpu")
    arguments = pretrain_arguments("vitg14", None, "/runs/x", [])
    with pytest.raises(ValueError, match="the local launcher runs on one node, not 4"):
        launch_plan("local", arguments, nodes=4, gpus_per_node=8, cluster=ClusterSettings(), name="x", environment={})
    with pytest.raises(ValueError, match="needs cluster.hostfile for 2 nodes"):
        launch_plan(
            "deepspeed", arguments, nodes=2, gpus_per_node=8, cluster=ClusterSettings(), name="x", environment={}
        )


def test_optimizer_offload_on_zero_0_is_refused_naming_both_keys():
    from dinov2.configuration import ConfigError
    from dinov2.configuration.recipes import load_recipe

    with pytest.raises(ConfigError, match="'deepspeed': Value error, offload_optimizer needs zero_stage 1, 2 or 3"):
        load_recipe("vitg14", ["deepspeed.zero_stage=0", "deepspeed.offload_optimizer=cpu"])


def test_deployments_and_commands_run_by_hand_write_outside_the_folders_dvc_owns(declared_deployments):
    """DVC deletes and restores what its stages output: a deployment or a command run with its defaults writes
    elsewhere (runs/), so `dvc status` stays clean after it and the next `dvc repro` deletes nothing of it."""
    import inspect

    import typer.main
    from dvc.repo import Repo

    from dinov2.cli import app

    owned = [Path(out.fs_path).relative_to(REPOSITORY) for out in Repo(str(REPOSITORY)).index.outs]
    assert Path("outputs/pretrain") in owned  # the check sees the pipeline's outputs

    def overlaps(path: str) -> bool:
        written = Path(path)
        return any(written == out or out in written.parents or written in out.parents for out in owned)

    written = {}
    for declared in declared_deployments:
        if declared.work_pool["name"] != "local":
            continue
        defaults = {
            name: parameter.default for name, parameter in inspect.signature(declared.flow.fn).parameters.items()
        }
        for name in ("output", "out", "metrics"):
            if name in defaults:
                written[f"{declared.name} {name}"] = declared.parameters.get(name, defaults[name])
    command = typer.main.get_command(app)
    for name, option in (("pretrain", "output"), ("distill", "output"), ("evaluate", "out"), ("evaluate", "metrics")):
        parameter = next(p for p in command.commands[name].params if p.name == option)
        written[f"dinov2 {name} --{option}"] = str(parameter.default)
    assert {"pretrain/cpu output", "distill/vits14 output", "evaluate/default out"} <= written.keys()
    assert [f"{who}: {path}" for who, path in written.items() if overlaps(path)] == []


def test_a_cluster_launch_warns_when_its_nodes_cannot_reach_the_tracking_server():
    """The plan (and the flow run's log) says so before anything is submitted; a local launch does not care."""
    parameters = deployment("pretrain/vitg")
    arguments = pretrain_arguments(parameters["recipe"], parameters.get("data"), parameters["output"], [])

    def plan(launcher: str, uri: str):
        environment = {**ENVIRONMENT, "MLFLOW_TRACKING_URI": uri}
        return launch_plan(
            launcher, arguments, nodes=1, gpus_per_node=1, cluster=ClusterSettings(), name="dinov2-test-0123abcd",
            environment=environment,
        )  # fmt: skip

    (warning,) = plan("slurm", "http://127.0.0.1:5000").warnings
    assert "http://127.0.0.1:5000" in warning and "cannot reach" in warning
    assert plan("kubernetes", "sqlite:///mlflow.db").warnings
    assert plan("slurm", "http://mlflow.cluster:5000").warnings == []
    assert plan("local", "http://127.0.0.1:5000").warnings == []
