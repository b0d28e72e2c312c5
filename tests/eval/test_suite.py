"""The evaluate stage on real Fashion-MNIST images: ordering of baselines, outputs, MLflow, bad input."""

import json
import os
from pathlib import Path

import mlflow
import pytest
import yaml

from dinov2.configuration.evaluation import EvaluateParams
from dinov2.eval.features import model_fingerprint
from dinov2.eval.suite import Backbone, load_evaluated_backbone, run_suite
from dinov2.hub import save_backbone

REPO = Path(__file__).resolve().parents[2]


def small_params(root: Path, cache: Path, **overrides) -> dict:
    params = {
        "dataset": "fashion_mnist",
        "train_dir": str(root / "train"),
        "test_dir": str(root / "test"),
        "evaluations": ["knn", "linear", "logreg", "retrieval", "segmentation"],
        "resize_size": 32,
        "crop_size": 32,
        "cache_dir": str(cache),
        "knn": {"ks": [10, 20]},
        "linear": {"epochs": 2, "learning_rates": [1e-3, 1e-2, 1e-1]},
        "logreg": {"n_c": 3, "c_min_exp": -2, "c_max_exp": 2, "max_iter": 200},
        "retrieval": {"n_instance_queries": 40},
        "segmentation": {"n_train_mosaics": 60, "n_test_mosaics": 20, "epochs": 2},
    }
    params.update(overrides)
    return params


def test_raw_pixels_beat_a_random_init_vit_which_sits_at_chance(image_folder, tiny_vit, tmp_path):
    # With LayerScale 1e-5 a random-init ViT's CLS token barely depends on the image: kNN is at chance
    # (10%). Centred raw pixels carry the garment's silhouette: measured 76.0% (random init 10.4%) on
    # this 1000/500-image Fashion-MNIST slice.
    root = image_folder(100, 50)
    params = EvaluateParams(**small_params(root, tmp_path / "cache", evaluations=["knn"]))
    model = tiny_vit()
    random_init = run_suite(params, Backbone("tiny", model, model_fingerprint(model))).metrics["knn_top1_k20"]
    pixels = run_suite(params, load_evaluated_backbone("raw_pixels")).metrics["knn_top1_k20"]
    print(f"kNN top-1@20: random-init ViT {random_init:.3f}, raw pixels {pixels:.3f}")
    assert random_init < 0.15
    assert pixels > 0.7
    assert pixels > random_init + 0.5


@pytest.mark.slow
def test_evaluate_writes_metrics_report_and_mlflow_run_and_reuses_features(
    image_folder, tiny_vit, tmp_path, mlflow_uri, run_dinov2
):
    root = image_folder(20, 10)
    checkpoint = save_backbone(tiny_vit(), tmp_path / "tiny.safetensors")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": small_params(root, tmp_path / "cache")}))
    args = ("evaluate", "--backbone", str(checkpoint), "--out", "report", "--metrics", "metrics/evaluate.json")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = run_dinov2(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())["fashion_mnist"]
    expected_keys = {"knn_top1_k10", "knn_top5_k10", "knn_top1_k20", "knn_top5_k20", "linear_top1", "linear_val_top1",
                     "logreg_top1", "logreg_c", "retrieval_class_map", "retrieval_instance_map",
                     "retrieval_instance_recall_k1", "segmentation_miou", "segmentation_pixel_accuracy"}  # fmt: skip
    assert expected_keys <= set(metrics)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "PROXY" in report
    for picture in ("knn_vs_k.png", "linear_grid.png", "pca_patches.png", "segmentation_overlay.png"):
        assert (tmp_path / "report" / picture).stat().st_size > 1000
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 5  # train, test, copies, mosaic train, mosaic test

    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("dinov2/evaluate")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["eval/fashion_mnist/knn_top1_k20"] == pytest.approx(metrics["knn_top1_k20"])
    assert run.data.metrics["eval/fashion_mnist/linear_top1"] == pytest.approx(metrics["linear_top1"])

    second = run_dinov2(*args, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text())["fashion_mnist"] == metrics


@pytest.mark.slow
def test_bad_input_fails_before_work_with_one_clear_line_and_leaves_no_outputs(
    image_folder, tiny_vit, tmp_path, photos, cli_error, monkeypatch
):
    root = image_folder(20, 10)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    photos[0].save(unlabelled / "a.png")
    fewer_classes = tmp_path / "fewer"
    (fewer_classes / "cat").mkdir(parents=True)
    photos[1].save(fewer_classes / "cat" / "b.png")
    checkpoint = save_backbone(tiny_vit(), tmp_path / "tiny.safetensors")
    cases = [
        ({"test_dir": str(unlabelled)}, ("--backbone", "raw_pixels"), "labels missing"),
        ({"test_dir": str(fewer_classes)}, ("--backbone", "raw_pixels"), "class mismatch"),
        ({}, ("--backbone", "dinov2_vits14", "--weights", str(checkpoint)), "does not match"),
        ({"knn": {"ks": [10], "temprature": 1}}, ("--backbone", "raw_pixels"), "unknown key 'knn.temprature'"),
    ]
    for overrides, args, message in cases:
        (tmp_path / "params.yaml").write_text(
            yaml.safe_dump({"evaluate": small_params(root, tmp_path / "c", **overrides)})
        )
        monkeypatch.chdir(tmp_path)  # in this process, as the console script runs it
        output = cli_error(["evaluate", *args, "--out", "report", "--metrics", "metrics.json"])
        assert message in output, output
        assert not (tmp_path / "report").exists() and not (tmp_path / "metrics.json").exists()
        assert not (tmp_path / "c").exists()  # no feature was extracted
