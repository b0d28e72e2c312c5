"""The collapse monitor: statistics worked out by hand, the monitor's window, and real runs that collapse
(LayerScale 1e-5 at initialisation: every image gets the same CLS token) or do not (LayerScale 1)."""

import json
import math
import os

import pytest
import torch

from dinov2.train.collapse import CollapseError, CollapseMonitor, target_statistics


def test_uniform_targets_from_identical_outputs_read_as_collapsed():
    bottleneck = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)  # four identical unit vectors
    stats = target_statistics("dino", bottleneck, torch.full((4, 8), 1 / 8))
    assert stats["dino_target_entropy"].item() == pytest.approx(1.0)  # ln 8 / ln 8
    assert stats["dino_bottleneck_cosine"].item() == pytest.approx(1.0)
    assert stats["dino_prototypes_used"].item() == 1.0


def test_one_hot_targets_from_orthogonal_outputs_read_as_alive():
    stats = target_statistics("ibot", torch.eye(4), torch.eye(4))
    assert stats["ibot_target_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["ibot_bottleneck_cosine"].item() == pytest.approx(0.0)
    assert stats["ibot_prototypes_used"].item() == 4.0
    # two of four targets at (1/2, 1/2): mean entropy ln 2 / 2, over ln 4 = 1/4
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert target_statistics("x", torch.eye(4), targets)["x_target_entropy"].item() == pytest.approx(
        (math.log(2) / 2) / math.log(4)
    )


def test_the_monitor_warns_once_after_a_full_window_past_the_grace_period_and_can_stop():
    collapsed = {"collapse/dino_target_entropy": 0.99, "collapse/dino_bottleneck_cosine": 0.5}
    alive = {"collapse/dino_target_entropy": 0.5, "collapse/dino_bottleneck_cosine": 0.5}
    monitor = CollapseMonitor(window=3, entropy=0.98, cosine=0.99, grace=2, stop=False)
    warned = [bool(monitor.update(i, collapsed)) for i in range(1, 9)]
    # iterations 1-2 are not judged; 3, 4, 5 are collapsed: the warning comes at 5, once
    assert warned == [False, False, False, False, True, False, False, False]
    monitor.update(9, alive)
    assert monitor.summary() == {"collapse/dino_collapsed_iterations": 6.0}
    stopping = CollapseMonitor(window=2, entropy=0.98, cosine=0.99, grace=0, stop=True)
    stopping.update(1, collapsed)
    with pytest.raises(CollapseError, match="DINO objective has collapsed"):
        stopping.update(2, collapsed)


@pytest.mark.slow
@pytest.mark.parametrize(("layerscale", "collapses"), [(1e-5, True), (1.0, False)])
def test_a_run_that_collapses_trips_the_monitor_and_one_that_does_not_stays_quiet(
    layerscale, collapses, image_folder, tmp_path, run_dinov2
):
    images = image_folder(4, 1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    arguments = [
        "pretrain", "--recipe", "cpu_tiny", "--data", str(images / "train"),
        "--output", str(tmp_path / "run"), "--set", "train.batch_size=8", "--set", "train.iterations_per_epoch=4",
        "--set", "optim.epochs=2", "--set", "monitor.grace_iterations=0", "--set", "monitor.window=4",
        "--set", f"student.layerscale={layerscale}",
    ]  # fmt: skip
    result = run_dinov2(*arguments, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert ("DINO objective has collapsed" in result.stderr) is collapses
    assert (metrics["collapse/dino_collapsed_iterations"] == 8.0) is collapses
    # measured: identical CLS tokens give a bottleneck cosine of 1.000; LayerScale 1 gives 0.3-0.5
    assert (metrics["collapse/dino_bottleneck_cosine"] > 0.99) is collapses

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("dinov2/pretrain").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/collapse/dino_target_entropy")) == 8
    assert ("dinov2.collapse" in run.data.tags) is collapses
