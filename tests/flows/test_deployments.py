"""The deployments as a user runs them: `prefect deploy --all`, then `prefect deployment run ... --watch`
against a real Prefect server, real workers and a real MLflow server on 127.0.0.1."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))

# 12 iterations of 8 images, a checkpoint every 4: the engine is killed after the first checkpoint (the task's
# retry resumes at 4), the worker after the second (the flow run crashes; retried, it resumes at 8)
TINY_RUN = json.dumps([
    "train.batch_size=8", "optim.epochs=1", "train.iterations_per_epoch=12", "checkpoint.every_n_iterations=4",
])  # fmt: skip
ITERATIONS = 12


def engine_pids(output: Path) -> list[int]:
    """The `dinov2 pretrain` processes writing ``output`` (the engine and any process it forked)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in listing.splitlines():
        pid, _, command = line.strip().partition(" ")
        if "dinov2 pretrain" in command and f"--output {output} " in command and "--dry-run" not in command:
            found.append(int(pid))
    return found


def wait_while_running(services, flow_run_id: str, timeout: float) -> dict:
    """The flow run's state once it is no longer scheduled, pending or running (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    state = services.api(f"/flow_runs/{flow_run_id}")["state"]
    while state["type"] in ("SCHEDULED", "PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.5)
        state = services.api(f"/flow_runs/{flow_run_id}")["state"]
    return state


def wait_for_checkpoint(output: Path, tag: str, deadline: float) -> None:
    latest = output / "checkpoints" / "latest"
    while time.monotonic() < deadline and not (latest.is_file() and latest.read_text().strip() == tag):
        time.sleep(0.05)


def kill_engine_then_worker(output: Path, worker_pid: int, killed: dict[str, list[int]], timeout: float = 540):
    """SIGKILL the `dinov2 pretrain` process writing ``output`` once its first checkpoint is complete, as a
    lost node or an out-of-memory kill would; SIGKILL the `local` pool's worker once the second is."""
    deadline = time.monotonic() + timeout
    wait_for_checkpoint(output, "iter_0000004", deadline)
    for pid in engine_pids(output):
        os.kill(pid, signal.SIGKILL)
        killed["engine"].append(pid)
    wait_for_checkpoint(output, "iter_0000008", deadline)
    if engine_pids(output):
        os.kill(worker_pid, signal.SIGKILL)
        killed["worker"].append(worker_pid)


@pytest.fixture(scope="module")
def flow_runs(services, deployment_runs, image_folder, tmp_path_factory):
    """The three deployment runs of this module, started together (the worker runs them side by side);
    the CPU run's engine is killed after its first checkpoint, the worker after the second."""
    output = tmp_path_factory.mktemp("pretrain_cpu") / "run"
    killed: dict[str, list[int]] = {"engine": [], "worker": []}
    worker_pid = json.loads((services.state_dir / "pids" / "worker-local.json").read_text())["pid"]
    killer = threading.Thread(target=kill_engine_then_worker, args=(output, worker_pid, killed), daemon=True)
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


@dataclass
class RecoveredRun:
    """The CPU run through both faults: what its first watch saw, and the retry that completed it."""

    flow_run_id: str
    output: Path
    killed: dict[str, list[int]]
    first_watch: tuple[int, str]  # exit code, output of `prefect deployment run --watch`
    crashed_state: dict
    engines_after_crash: list[int]
    checkpoint_at_crash: str
    retry: subprocess.CompletedProcess
    final_state: dict  # the flow run's state when the retried run ended


@pytest.fixture(scope="module")
def recovered_cpu_run(services, deployment_runs, flow_runs, flows_services) -> RecoveredRun:
    """Wait for the CPU run to crash with its worker, start the worker again (`make up`) and retry the flow
    run (`prefect flow-run retry`), as flows/README.md tells a person to; wait for it to end."""
    returncode, flow_run_id, output = deployment_runs.finish(flow_runs[0]["cpu"])
    run_folder, killed = flow_runs[1], flow_runs[2]
    state = wait_while_running(services, flow_run_id, timeout=120)
    # The launch task terminated the engine before the run was marked crashed; the engine's data-loader
    # worker (same command line, reads images only) notices its parent's exit within its 5 s status check.
    deadline = time.monotonic() + 30
    while (engines := engine_pids(run_folder)) and time.monotonic() < deadline:
        time.sleep(0.5)
    checkpoint = (run_folder / "checkpoints" / "latest").read_text().strip()
    restarted = flows_services("up", services.environment)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    retry = subprocess.run(
        [PREFECT, "flow-run", "retry", flow_run_id], cwd=REPOSITORY, env=services.environment, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    # polled, not `prefect flow-run watch`: its event stream closed early once on a loaded machine
    final_state = wait_while_running(services, flow_run_id, timeout=540) if retry.returncode == 0 else {}
    return RecoveredRun(
        flow_run_id, run_folder, killed, (returncode, output), state, engines, checkpoint, retry, final_state
    )


def artifacts_of(services, flow_run_id: str) -> dict[str, str]:
    found = services.api("/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {artifact["key"]: artifact["data"] for artifact in found}


def task_runs_of(services, flow_run_id: str) -> dict[str, dict]:
    found = services.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {task_run["name"]: task_run for task_run in found}


def test_deploy_all_registers_every_deployment_on_its_work_pool(services, deployed, declared_deployments):
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    deployments = services.api("/deployments/filter", {})
    flows = {flow["id"]: flow["name"] for flow in services.api("/flows/filter", {})}
    pools = {f"{flows[d['flow_id']]}/{d['name']}": d["work_pool_name"] for d in deployments}
    # every deployment prefect.yaml declares, and nothing else, on the pool it names (which pool each deployment
    # belongs on is tested in test_infra.py)
    assert pools == {declared.name: declared.work_pool["name"] for declared in declared_deployments}
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
    # the services here listen on 127.0.0.1, which no compute node reaches: the plan says so before any submission
    assert "cannot reach it" in plan


def test_cpu_pretraining_killed_after_a_checkpoint_resumes_completes_and_is_tagged_in_mlflow(
    services, recovered_cpu_run
):
    from mlflow.tracking import MlflowClient

    run = recovered_cpu_run
    flow_run_id, run_folder = run.flow_run_id, run.output
    messages = services.log_messages(flow_run_id)
    assert run.final_state["type"] == "COMPLETED", "\n".join(messages[-60:])
    # the engine and any process it forked, which shares its command line
    assert run.killed["engine"], "the engine was not running after its first checkpoint"
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert metrics["iteration"] == ITERATIONS
    assert (run_folder / "teacher" / "backbone.safetensors").is_file()
    # the first attempt's launch task ran twice: killed (transient), then the same command again
    task_runs = task_runs_of(services, flow_run_id)
    assert sorted(r["run_count"] for name, r in task_runs.items() if name.startswith("launch_run")) == [1, 2]
    # its second launch resumed from the first checkpoint (iteration 4), not from scratch
    assert any(f"resumed from {run_folder / 'checkpoints' / 'iter_0000004'} at iteration 4" in m for m in messages)
    # the engine's output reached the Prefect logs line by line: three launches (killed, retried, flow retried)
    assert sum(m.startswith("$ ") and "dinov2 pretrain" in m and "--dry-run" not in m for m in messages) == 3
    assert any(f'"iteration": {ITERATIONS}' in m for m in messages), services.log_delivery_errors()

    client = MlflowClient(services.mlflow_url)
    experiment = client.get_experiment_by_name("dinov2/pretrain")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert runs and all(r.data.tags["dinov2.recipe"] == "cpu_tiny" for r in runs)
    results = artifacts_of(services, flow_run_id)["pretrain-results"]
    for r in runs:
        assert f"{services.mlflow_url}/#/experiments/{experiment.experiment_id}/runs/{r.info.run_id}" in results
    assert f"| `iteration` | {ITERATIONS} |" in results


def test_a_killed_worker_crashes_its_flow_run_and_the_retried_run_resumes_from_the_checkpoint(
    services, recovered_cpu_run
):
    from mlflow.tracking import MlflowClient

    run = recovered_cpu_run
    flow_run_id, run_folder = run.flow_run_id, run.output
    assert run.killed["worker"], "the engine was not running after its second checkpoint"
    # the flow run outlived its worker only until its next output line: Prefect marked it crashed, and the
    # launch task stopped the engine on its way out, so nothing else writes the run folder
    assert run.first_watch[0] != 0
    assert run.crashed_state["type"] == "CRASHED", run.crashed_state
    assert run.engines_after_crash == []
    assert run.checkpoint_at_crash == "iter_0000008"
    # a new worker alone does not touch a crashed run; `prefect flow-run retry` schedules it again and the
    # new worker runs it under the same id, to completion
    assert run.retry.returncode == 0, run.retry.stdout + run.retry.stderr
    assert "has been scheduled for retry" in run.retry.stdout
    flow_run = services.api(f"/flow_runs/{flow_run_id}")
    messages = services.log_messages(flow_run_id)
    assert run.final_state["type"] == "COMPLETED", "\n".join(messages[-60:])
    assert (flow_run["state"]["type"], flow_run["run_count"]) == ("COMPLETED", 2)
    # both UIs name the run for its recipe and output folder
    assert flow_run["name"] == f"cpu_tiny -> {run_folder}"
    checkpoint = run_folder / "checkpoints" / "iter_0000008"
    assert [m for m in messages if m.startswith("INFO dinov2.train.train: resumed from")][-1:] == [
        f"INFO dinov2.train.train: resumed from {checkpoint} at iteration 8"
    ], services.log_delivery_errors()

    # every iteration once in the run's history; iterations 9 on were computed again after the crash, to
    # the same losses (the engine is deterministic on CPU), so the MLflow history agrees with the CSV
    history = (run_folder / "plots" / "train.csv").read_text().splitlines()
    columns = history[0].split(",")
    rows = [dict(zip(columns, line.split(","), strict=True)) for line in history[1:]]
    assert [int(row["step"]) for row in rows] == list(range(1, ITERATIONS + 1))
    csv_loss = {int(row["step"]): float(row["total_loss"]) for row in rows}

    # nothing half-registered: one MLflow run for the flow run, finished, continued (not reopened) by each
    # resume, with its final teacher logged once
    client = MlflowClient(services.mlflow_url)
    experiment = client.get_experiment_by_name("dinov2/pretrain")
    (mlflow_run,) = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_name == f"cpu_tiny -> {run_folder}"
    assert {"dinov2.resumed_at_4", "dinov2.resumed_at_8"} <= set(mlflow_run.data.tags)
    assert (run_folder / "mlflow_run_id").read_text().strip() == mlflow_run.info.run_id
    assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "teacher")] == [
        "teacher/backbone.safetensors", "teacher/heads.safetensors",
    ]  # fmt: skip
    logged = client.get_metric_history(mlflow_run.info.run_id, "train/total_loss")
    assert sorted(m.step for m in logged) == sorted(csv_loss)  # each step once, though 9-12 were trained twice
    for metric in logged:
        assert metric.value == pytest.approx(csv_loss[metric.step], rel=1e-5), metric.step
    results = artifacts_of(services, flow_run_id)["pretrain-results"]
    assert results.count(f"/#/experiments/{experiment.experiment_id}/runs/") == 1


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
