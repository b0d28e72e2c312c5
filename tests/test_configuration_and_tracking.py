"""Config validation names bad keys; MLflow runs land on a real server with the project's tags."""

import mlflow
import pytest
from pydantic import Field

from dinov2.configuration import ConfigError, Section, flatten, merge, validate
from dinov2.configuration.params import load_section
from dinov2.tracking import tracked_run


class Knn(Section):
    ks: list[int] = Field(default_factory=lambda: [10, 20])
    temperature: float = Field(0.07, gt=0)


class Evaluate(Section):
    knn: Knn = Field(default_factory=Knn)
    batch_size: int = 64


def test_a_valid_section_fills_defaults(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  knn:\n    ks: [5]\n")
    section = load_section(params, "evaluate", Evaluate)
    assert section.knn.ks == [5] and section.knn.temperature == 0.07 and section.batch_size == 64


def test_unknown_and_wrong_keys_are_named_with_their_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  knn:\n    kss: [5]\n    temperature: -1\n")
    with pytest.raises(ConfigError) as error:
        load_section(params, "evaluate", Evaluate)
    message = str(error.value)
    assert "unknown key 'knn.kss'" in message
    assert "'knn.temperature': Input should be greater than 0" in message
    assert str(params) in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_section(tmp_path / "nope.yaml", "evaluate", Evaluate)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_section(bad, "evaluate", Evaluate)


def test_recipes_merge_deeply_and_flatten_for_logging():
    default = {"optim": {"lr": 4e-3, "epochs": 100}, "crops": {"n_local": 8}}
    delta = {"optim": {"lr": 2e-4}}
    merged = merge(default, delta)
    assert merged == {"optim": {"lr": 2e-4, "epochs": 100}, "crops": {"n_local": 8}}
    assert default["optim"]["lr"] == 4e-3  # the default is not modified
    assert flatten(merged) == {"optim.lr": 2e-4, "optim.epochs": 100, "crops.n_local": 8}
    assert validate(Evaluate, {}, "x").batch_size == 64


def test_a_tracked_run_lands_on_the_server_with_tags_params_and_config(mlflow_uri, monkeypatch):
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0000-flow-run")
    config = {"knn": {"ks": [10, 20]}, "batch_size": 64}
    with tracked_run("evaluate", recipe="cpu_tiny", config=config) as tracker:
        tracker.log_metrics({"eval/cifar10/knn_top1_k20": 0.5}, step=0)
        run_id = tracker.run_id
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "dinov2/evaluate"
    assert run.data.tags["dinov2.recipe"] == "cpu_tiny"
    assert run.data.tags["prefect.flow_run_id"] == "0000-flow-run"
    assert len(run.data.tags["git.commit"]) in (40, len("unknown"))
    assert run.data.params == {"knn.ks": "[10, 20]", "batch_size": "64"}
    assert run.data.metrics == {"eval/cifar10/knn_top1_k20": 0.5}
    artifacts = [item.path for item in client.list_artifacts(run_id, "config")]
    assert artifacts == ["config/resolved.yaml"]


def test_only_rank_zero_talks_to_mlflow(mlflow_uri, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with tracked_run("evaluate") as tracker:
        tracker.log_metrics({"x": 1.0})
        assert tracker.run_id is None


def test_tracking_off_opens_no_run_and_a_wrong_value_is_named(mlflow_uri, monkeypatch):
    monkeypatch.setenv("DINOV2_TRACKING", "off")
    with tracked_run("untracked-stage", config={"batch_size": 64}) as tracker:
        tracker.log_metrics({"x": 1.0})
        assert tracker.run_id is None
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_experiment_by_name("dinov2/untracked-stage") is None
    monkeypatch.setenv("DINOV2_TRACKING", "no")
    with pytest.raises(ValueError, match="DINOV2_TRACKING='no': Input should be 'on' or 'off'"):
        with tracked_run("evaluate"):
            pass
