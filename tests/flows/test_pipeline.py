"""The DVC pipeline for real: `dinov2 pipeline`, `dvc repro` and the `pipeline/default` deployment (through
the local worker) in a temporary git repository holding the project's dvc.yaml and a reduced params.yaml,
on the embedded default data (Fashion-MNIST + planted copies + distractors), every stage the real command."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dinov2.configuration import merge

pytestmark = pytest.mark.slow

REPOSITORY = Path(__file__).resolve().parents[2]
STAGES = {
    "prepare", "descriptor", "embed@pool", "embed@eval_test", "embed@eval_train", "embed_retrieval@pool",
    "embed_retrieval@seed", "dedup", "retrieve", "pretrain", "distill", "evaluate@raw_pixels", "evaluate@teacher_init",
    "evaluate@teacher", "evaluate@student_init", "evaluate@student", "report",
}  # fmt: skip
# 6 iterations of 16 images for both trainings
SHORT_TRAINING = {
    "train": {"batch_size": 16, "iterations_per_epoch": 3},
    "optim": {"epochs": 2, "warmup_epochs": 0},
    "checkpoint": {"every_n_iterations": 3, "export_every_n_iterations": 6},
    "evaluation": {"knn_max_train_images": 100, "knn_max_test_images": 50},
}


def reduced_params() -> dict:
    small = {
        "prepare": {
            "default_data": dict(
                seed_per_class=4,
                pool_images=200,
                eval_train_per_class=10,
                eval_test_per_class=5,
                pool_duplicates=20,
                test_copies=10,
                distractor_digits=20,
                distractor_photos=4,
            )
        },  # fmt: skip
        # one epoch of a small descriptor: seconds
        "descriptor": dict(
            epochs=1,
            width=8,
            blocks_per_stage=1,
            dim=32,
            batch_size=32,
            num_workers=0,
            calibration={"images": 40, "pool_images": 100},
        ),  # fmt: skip
        "dedup": {"k": 8},
        "retrieve": {"n_clusters": 4},
        "pretrain": SHORT_TRAINING,
        "distill": SHORT_TRAINING,
        "evaluate": {"evaluations": ["knn"], "knn": {"ks": [5, 20]}},
    }
    # merge copies: shared dicts would be written as YAML anchors, and one section's edit would change both
    return merge(yaml.safe_load((REPOSITORY / "params.yaml").read_text()), small)


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """A git + DVC repository with the project's pipeline, code (the stages' code dependencies) and recipes."""
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("dinov2", "configs"):
        shutil.copytree(REPOSITORY / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPOSITORY / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(reduced_params(), sort_keys=False))
    (root / ".gitignore").write_text("outputs/\n")
    env = environment(root)
    run(["git", "init", "-q"], root, env)
    run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline"], root, env)
    return root


def environment(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }  # fmt: skip


@pytest.mark.timeout(1800)
def test_the_pipeline_runs_every_stage_once_reruns_what_changed_and_records_experiments(
    repository, services, deployment_runs, run_dinov2
):
    env = environment(repository)
    dvc = str(Path(sys.executable).with_name("dvc"))

    first = run_dinov2("pipeline", cwd=repository, env=env, timeout=1500, check=True)
    assert stages_run(first.stdout) == STAGES

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("dinov2/pipeline").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`dinov2.stage` = 'pipeline'")
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
    )
    assert {child.data.tags["dvc.stage"] for child in children} == STAGES
    lock = yaml.safe_load((repository / "dvc.lock").read_text())["stages"]
    assert set(lock) == STAGES
    for child in children:
        assert len(child.data.tags["dvc.deps_hash"]) == 64
        assert child.data.tags["git.commit"] != "unknown"
    # trained backbones registered; the first version of each is candidate and champion
    for name in ("dinov2-teacher", "dinov2-student-tiny"):
        version = client.get_model_version_by_alias(name, "champion")
        assert int(version.version) == int(client.get_model_version_by_alias(name, "candidate").version) == 1

    again = run([dvc, "repro"], repository, env)
    assert stages_run(again.stdout) == set()
    assert "Data and pipelines are up to date" in again.stdout

    # one distillation knob, then the pipeline/default deployment through the worker: DVC reruns the
    # distillation, the evaluations of its student and the report, nothing else
    params = yaml.safe_load((repository / "params.yaml").read_text())
    params["distill"]["optim"]["base_lr"] = 0.01
    (repository / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    returncode, flow_run_id, output = deployment_runs.finish(
        deployment_runs.start("pipeline/default", f"repository={json.dumps(str(repository))}")
    )
    assert returncode == 0, output
    # the student at initialisation does not depend on the lr: DVC skips its evaluation when the
    # re-exported file is byte-identical, which it is with the same seed
    ran = stages_run("\n".join(services.log_messages(flow_run_id)))
    assert (
        {"distill", "evaluate@student", "report"}
        <= ran
        <= {"distill", "evaluate@student_init", "evaluate@student", "report"}
    )
    # the worker's stages log to the services' MLflow server, tagged with the flow run and the DVC stage
    server = mlflow.MlflowClient(tracking_uri=services.mlflow_url)
    distilled = server.search_runs(
        [server.get_experiment_by_name("dinov2/distill").experiment_id],
        f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
    )
    assert distilled and {(r.info.status, r.data.tags["dvc.stage"]) for r in distilled} == {("FINISHED", "distill")}
    assert any("train/total_loss" in r.data.metrics for r in distilled)
    artifacts = services.api("/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    assert {"distill-results", "report-results"} <= {artifact["key"] for artifact in artifacts}

    run(["git", "add", "-A"], repository, env)
    run(["git", "commit", "-qm", "distill lr"], repository, env)
    # an experiment on the report's knob reruns the report alone, and exp show lists its metrics
    experiment = run([dvc, "exp", "run", "-S", "+report.duplicate_groups=2", "--name", "two-groups"], repository, env)
    assert stages_run(experiment.stdout) == {"report"}
    shown = json.loads(run([dvc, "exp", "show", "--json"], repository, env).stdout)
    experiments = [
        exp for baseline in shown for exp in (baseline.get("experiments") or []) if exp.get("name") == "two-groups"
    ]
    assert len(experiments) == 1
    (revision,) = experiments[0]["revs"]
    metrics = revision["data"]["metrics"]
    assert metrics["outputs/pretrain/metrics.json"]["data"]["iteration"] == 6
    assert "knn_top1_k20" in metrics["outputs/evaluate/teacher/metrics.json"]["data"]["fashion_mnist"]
    assert revision["data"]["params"]["params.yaml"]["data"]["report"]["duplicate_groups"] == 2
