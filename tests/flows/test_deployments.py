"""The deployments as a user runs them: `prefect deploy --all`, then `prefect deployment run ... --watch`
against a real Prefect server, real workers and a real MLflow server on 127.0.0.1."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]

# 8 iterations of 8 images, a checkpoint every 4: killed after the first, resumed for the last 4
TINY_RUN = json.dumps([
    "train.batch_size=8", "optim.epochs=1", "train.iterations_per_epoch=8", "checkpoint.every_n_iterations=4",
])  # fmt: skip


def kill_engine_after_first_checkpoint(output: Path, killed: list[int], timeout: float = 540) -> None:
    """SIGKILL the `dinov2 pretrain` process writing ``output`` once its first checkpoint is complete,
    as a lost node or an out-of-memory kill would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (output / "checkpoints" / "latest").is_file():
        time.sleep(0.05)
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        pid, _, command = line.strip().partition(" ")
        if "dinov2 pretrain" in command and f"--output {output} " in command and "--dry-run" not in command:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))


@pytest.fixture(scope="module")
def flow_runs(deployment_runs, image_folder, tmp_path_factory):
    """The three deployment runs of this module, started together (the worker runs them side by side);
    the CPU run's engine is killed after its first checkpoint."""
    output = tmp_path_factory.mktemp("pretrain_cpu") / "run"
    killed: list[int] = []
    killer = threading.Thread(target=kill_engine_after_first_checkpoint, args=(output, killed), daemon=True)
    killer.start()
    started = {
        "vitg dry run": deployment_runs.start("pretrain/vitg", "dry_run=true"),
        "cpu": deployment_runs.start(
            "pretrain/cpu",
            f"data={json.dumps(str(image_folder(4, 0) / 'train'))}",
            f"output={json.dumps(str(output))}",
            f"overrides={TINY_RUN}",
            "retry_delay_seconds=1",
        ),
        "unknown recipe": deployment_runs.start("pretrain/cpu", 'recipe="vitq99"'),
    }
    return started, output, killed


def log_messages(services, flow_run_id: str) -> list[str]:
    """Every log line of a flow run, oldest first (the API answers 200 at a time)."""
    messages: list[str] = []
    while True:
        page = services.api(
            "/logs/filter",
            {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "offset": len(messages)},
        )
        if not page:
            return messages
        messages += [entry["message"] for entry in page]


def artifacts_of(services, flow_run_id: str) -> dict[str, str]:
    found = services.api("/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {artifact["key"]: artifact["data"] for artifact in found}


def task_runs_of(services, flow_run_id: str) -> dict[str, dict]:
    found = services.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {task_run["name"]: task_run for task_run in found}


def test_deploy_all_registers_every_deployment_on_its_work_pool(services, deployed):
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployments = services.api("/deployments/filter", {})
    flows = {flow["id"]: flow["name"] for flow in services.api("/flows/filter", {})}
    pools = {f"{flows[d['flow_id']]}/{d['name']}": d["work_pool_name"] for d in deployments}
    assert pools == {
        "pretrain/vitg": "gpu-cluster", "pretrain/vitl": "gpu-cluster", "pretrain/cpu": "local",
        "distill/vits14": "local", "curate/default": "local", "evaluate/default": "local",
        "pipeline/default": "local",
    }  # fmt: skip
    # flow runs start in this checkout, wherever it is
    for deployment in deployments:
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPOSITORY)}}
        ]


def test_vitg_dry_run_completes_and_publishes_its_plan(services, deployment_runs, flow_runs):
    returncode, flow_run_id, output = deployment_runs.finish(flow_runs[0]["vitg dry run"])
    assert returncode == 0, output
    plan = artifacts_of(services, flow_run_id)["pretrain-plan-vitg14"]
    assert "| student parameters | 1,234,919,040 |" in plan
    # 3072 images over 32 nodes x 8 GPUs: 12 per GPU; ZeRO-2 needs 30.6 GiB each (the engine's dry run)
    assert "| 256 (this launch) | 12 | 44.3 | 35.2 | 30.6 | 21.4 |" in plan
    assert "sbatch --parsable pretrain.sbatch" in plan
    assert "#SBATCH --nodes=32" in plan and "#SBATCH --gpus-per-node=8" in plan
    assert f"export PREFECT__FLOW_RUN_ID={flow_run_id}" in plan
    assert "-m dinov2 pretrain --recipe vitg14 --data /mnt/dinov2/data/curated.parquet" in plan


def test_cpu_pretraining_killed_after_a_checkpoint_resumes_completes_and_is_tagged_in_mlflow(
    services, deployment_runs, flow_runs
):
    from mlflow.tracking import MlflowClient

    returncode, flow_run_id, output = deployment_runs.finish(flow_runs[0]["cpu"])
    messages = log_messages(services, flow_run_id)
    assert returncode == 0, output + "\n".join(messages[-60:])
    run_folder, killed = flow_runs[1], flow_runs[2]
    # the engine and any process it forked, which shares its command line
    assert killed, "the engine was not running after its first checkpoint"
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert metrics["iteration"] == 8
    assert (run_folder / "teacher" / "backbone.safetensors").is_file()
    # the launch task ran twice: killed (transient), then the same command again
    task_runs = task_runs_of(services, flow_run_id)
    assert [run["run_count"] for name, run in task_runs.items() if name.startswith("launch_run")] == [2]
    # the second launch resumed from the first checkpoint (iteration 4), not from scratch
    assert any(f"resumed from {run_folder / 'checkpoints' / 'iter_0000004'} at iteration 4" in m for m in messages)
    # the engine's output reached the Prefect logs line by line
    assert sum(m.startswith("$ ") and "dinov2 pretrain" in m and "--dry-run" not in m for m in messages) == 2
    assert any('"iteration": 8' in m for m in messages)

    client = MlflowClient(services.mlflow_url)
    experiment = client.get_experiment_by_name("dinov2/pretrain")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert runs and all(run.data.tags["dinov2.recipe"] == "cpu_tiny" for run in runs)
    results = artifacts_of(services, flow_run_id)["pretrain-results"]
    for run in runs:
        assert f"{services.mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in results
    assert "| `iteration` | 8 |" in results


def test_an_unknown_recipe_fails_at_once_naming_it(services, deployment_runs, flow_runs):
    returncode, flow_run_id, output = deployment_runs.finish(flow_runs[0]["unknown recipe"])
    assert returncode != 0
    state = services.api(f"/flow_runs/{flow_run_id}")["state"]
    assert state["type"] == "FAILED"
    assert "unknown recipe 'vitq99'" in state["message"]
    task_runs = task_runs_of(services, flow_run_id)
    # the engine's dry run refused it (exit code 2): not retried, nothing launched
    assert list(task_runs) == ["dry-run-vitq99"]
    assert task_runs["dry-run-vitq99"]["run_count"] == 1
