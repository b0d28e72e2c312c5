"""benchmarks/pretrain/learning_curve.py: the collapse figures it reports, its errors, and one tiny curve."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2.configuration.recipes import load_recipe

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pretrain" / "learning_curve.py"


def load_script():
    spec = importlib.util.spec_from_file_location("learning_curve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uniform_targets_give_a_dino_loss_of_exactly_ln_k():
    curve = load_script()
    ln_k = math.log(1024)
    # cpu_tiny: 4 local crops, so 10 (student, teacher) pairs: 8 local terms and 2 global ones, each
    # logged divided by 10; a pair's cross-entropy is ln K when the targets and predictions are uniform
    uniform = {"dino_local_crops_loss": 8 * ln_k / 10, "dino_global_crops_loss": 2 * ln_k / 10}
    row = {**uniform, "images_per_second": 100.0, "collapse/dino_target_entropy": 1.0}
    statistics = curve.collapse_statistics([row] * 3, load_recipe("cpu_tiny"))
    assert statistics["dino_loss_over_ln_k"] == pytest.approx(1.0)
    assert statistics["dino_target_entropy"] == 1.0
    # no local crops: one global pair counted twice over 3 terms, so the logged loss is 2/3 of a pair's
    no_local = load_recipe("cpu_tiny", ["crops.local_crops_number=0"])
    half = {"dino_global_crops_loss": 2 * (ln_k / 2) / 3, "images_per_second": 100.0}
    assert curve.collapse_statistics([half], no_local)["dino_loss_over_ln_k"] == pytest.approx(0.5)


def run_script(*arguments: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_bad_arguments_get_a_one_line_error_and_no_output(tmp_path):
    missing = run_script(
        "--data", str(tmp_path / "nowhere"), "--knn-data", str(tmp_path), "--output", str(tmp_path / "out"),
        tmp_path=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == f"error: --data {tmp_path / 'nowhere'} is not a folder"
    assert not (tmp_path / "out").exists()
    both = run_script(
        "--fashion-mnist", "3", "--data", str(tmp_path), "--output", str(tmp_path / "out"), tmp_path=tmp_path
    )
    assert (
        both.stderr.strip().splitlines()[-1] == "error: --fashion-mnist brings its own data: drop --data and --knn-data"
    )


@pytest.mark.slow
def test_a_tiny_curve_on_fashion_mnist(tmp_path):
    output = tmp_path / "curve"
    result = run_script(
        "--fashion-mnist", "3", "--output", str(output), "--iterations", "4", "--every", "2",
        "--knn-train", "30", "--knn-test", "20", "--set", "train.batch_size=8", "--set", "train.iterations_per_epoch=2",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (output / "curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["iteration"], row["images_seen"]) for row in rows] == [("0", "0"), ("2", "16"), ("4", "32")]
    assert rows[0]["minutes"] == "0.0" and float(rows[2]["minutes"]) >= float(rows[1]["minutes"]) > 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["iterations"] == 4 and summary["knn_top1_k20"] == float(rows[2]["knn_top1_k20"])
    # 20 test images, 2 per class: every accuracy is a multiple of 1/20
    for key in ("knn_top1_k20_raw_pixels", "knn_top1_k20_init", "knn_top1_k20"):
        assert round(summary[key] * 20, 6) == round(summary[key] * 20)
    assert 0 < summary["dino_loss_over_ln_k"] < 1.5 and 0 < summary["dino_target_entropy"] <= 1
    assert (output / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
