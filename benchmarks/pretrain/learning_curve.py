"""Learning curve of a pretraining recipe: the teacher's kNN accuracy against minutes and images seen.

Trains with the project's own command (`dinov2 pretrain`, in a subprocess, exporting the teacher
every ``--every`` iterations), then evaluates every export with the engine's kNN (the evaluation
suite's weighted kNN on the CLS token, k=20, on a class-strided slice of ``<knn-data>/train`` and
``/test``), next to two baselines on the same slice: raw pixels (flattened RGB in [0, 1], centred by
the train mean image, as the evaluation suite does) and the model at initialisation (the export of
iteration 0). Minutes are read from the exports' modification times, so evaluation does not count.

Writes ``<output>/curve.csv`` (one row per export), ``<output>/curve.png`` and ``<output>/summary.json``
(the baselines, the final kNN and the collapse statistics of the last iterations: teacher-target
entropy / ln K, bottleneck cosine, prototypes used, DINO loss / ln K) and prints the summary.

    python benchmarks/pretrain/learning_curve.py --recipe cpu_tiny --data cifar10/train \
        --knn-data cifar10 --output runs/curve --iterations 1800 --set train.batch_size=64
    python benchmarks/pretrain/learning_curve.py --recipe cpu_tiny --fashion-mnist 1000 --output runs/fm

``--iterations N`` sets the schedule's length (``optim.epochs`` = N / iterations per epoch);
``--minutes M`` stops training after M minutes of wall clock, wherever the schedule is then.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dinov2.atomic import write_atomically, write_json
from dinov2.configuration.recipes import Recipe, load_recipe

TAIL_ITERATIONS = 20  # collapse statistics are averaged over the last iterations of the run


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="cpu_tiny", help="recipe name in configs/recipes/ or a .yaml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override section.key=v")
    parser.add_argument("--data", type=Path, help="image folder to pretrain on")
    parser.add_argument("--knn-data", type=Path, help="ImageFolder root with train/ and test/ class folders")
    parser.add_argument(
        "--fashion-mnist", type=int, metavar="PER_CLASS",
        help="pretrain and evaluate on a Fashion-MNIST folder of PER_CLASS train (100 test) images per class",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, required=True, help="new folder for the run and the curve")
    parser.add_argument("--iterations", type=int, help="schedule length in iterations [default: the recipe's]")
    parser.add_argument("--minutes", type=float, help="stop training after this many minutes of wall clock")
    parser.add_argument("--every", type=int, default=100, help="export (and evaluate) every N iterations")
    parser.add_argument("--knn-train", type=int, default=2000, help="kNN train images (class-strided slice)")
    parser.add_argument("--knn-test", type=int, default=1000, help="kNN test images (class-strided slice)")
    return parser.parse_args(argv)


def check_arguments(arguments: argparse.Namespace) -> None:
    """Every mistake a person can make on the command line, before any training starts."""
    if arguments.fashion_mnist is None and (arguments.data is None or arguments.knn_data is None):
        raise ValueError("give --data and --knn-data, or --fashion-mnist PER_CLASS")
    if arguments.fashion_mnist is not None and (arguments.data or arguments.knn_data):
        raise ValueError("--fashion-mnist brings its own data: drop --data and --knn-data")
    for name in ("data", "knn_data"):
        path = getattr(arguments, name)
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path} is not a folder")
    if arguments.knn_data is not None and not (arguments.knn_data / "train").is_dir():
        raise FileNotFoundError(f"--knn-data {arguments.knn_data} needs train/ and test/ class folders")
    if arguments.output.exists():
        raise FileExistsError(f"--output {arguments.output} exists: give a new folder")
    for name in ("iterations", "minutes", "every", "knn_train", "knn_test", "fashion_mnist"):
        value = getattr(arguments, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def budget_overrides(recipe: Recipe, iterations: int | None, every: int) -> list[str]:
    """Overrides that set the schedule's length and the export (and checkpoint) cadence."""
    overrides = [f"checkpoint.export_every_n_iterations={every}", f"checkpoint.every_n_iterations={every}"]
    if iterations is not None:
        overrides.append(f"optim.epochs={math.ceil(iterations / recipe.train.iterations_per_epoch)}")
    return overrides


def train(arguments: argparse.Namespace, overrides: list[str], run: Path, data: Path) -> float:
    """`dinov2 pretrain` in a subprocess; returns its start time (epoch seconds)."""
    command = [sys.executable, "-m", "dinov2", "pretrain", "--recipe", arguments.recipe, "--data", str(data)]
    command += ["--output", str(run)]
    for override in overrides:
        command += ["--set", override]
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(run.parent / 'mlflow.db').resolve()}"}
    start = time.time()
    with open(run.parent / "pretrain.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            code = process.wait(timeout=arguments.minutes * 60 if arguments.minutes else None)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
            code = 0
    if code not in (0, 4):  # 4: the recipe asked to stop on collapse; its curve is still worth reading
        raise RuntimeError(f"dinov2 pretrain exited with code {code}; see {run.parent / 'pretrain.log'}")
    return start


def pixel_knn(root: Path, recipe: Recipe) -> float:
    """kNN top-1 (k=20) of raw pixels on the slice the backbones are evaluated on."""
    from torchvision.transforms import v2

    from dinov2.eval.datasets import LabelledImageFolder
    from dinov2.eval.features import extract_features
    from dinov2.eval.knn import knn_classify

    size = recipe.crops.global_crops_size
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )
    evaluation = recipe.evaluation

    def pixels(split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the class-strided slice the engine's kNN takes (dinov2.train.monitoring.backbone_knn)
        dataset = LabelledImageFolder(root / split, transform=transform)
        stride = max(len(dataset) // limit, 1)
        subset = torch.utils.data.Subset(dataset, list(range(0, len(dataset), stride))[:limit])
        return extract_features(None, subset, feature_fn=lambda _, images: images.flatten(1))

    train_features, train_labels = pixels("train", evaluation.knn_max_train_images)
    test_features, test_labels = pixels("test", evaluation.knn_max_test_images)
    mean_image = train_features.mean(dim=0, keepdim=True)
    result = knn_classify(train_features - mean_image, train_labels, test_features - mean_image, test_labels, ks=(20,))
    return result["knn_top1_k20"]


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open() as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def collapse_statistics(history: list[dict[str, float]], recipe: Recipe) -> dict[str, float]:
    """Means over the last iterations: what the collapse monitor watches, and the DINO loss against ln K.

    The engine logs the local and global DINO terms each divided by the number of (student, teacher)
    pairs, so their sum times n_terms / (2 * n_local + 2) is the mean cross-entropy of one pair, which
    equals ln K exactly when every target is uniform."""
    tail = history[-TAIL_ITERATIONS:]
    n_local = recipe.crops.local_crops_number
    n_terms = 2 + max(2 * n_local, 1)
    statistics = {}
    for key in tail[0]:
        if key.startswith("collapse/"):
            statistics[key.removeprefix("collapse/")] = sum(row[key] for row in tail) / len(tail)
    dino = [
        (row.get("dino_local_crops_loss", 0.0) + row["dino_global_crops_loss"]) * n_terms / (2 * n_local + 2)
        for row in tail
    ]
    statistics["dino_loss_over_ln_k"] = sum(dino) / len(dino) / math.log(recipe.dino.head_n_prototypes)
    statistics["images_per_second"] = sum(row["images_per_second"] for row in tail) / len(tail)
    return statistics


def curve_rows(run: Path, root: Path, recipe: Recipe, start: float) -> list[dict[str, float]]:
    from dinov2.hub import load_backbone
    from dinov2.train.monitoring import backbone_knn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for folder in sorted((run / "exports").glob("iter_*")):
        weights = folder / "teacher" / "backbone.safetensors"
        if not weights.is_file():
            continue
        iteration = int(folder.name.removeprefix("iter_"))
        knn = backbone_knn(load_backbone(weights).eval(), root, recipe, device)
        rows.append({
            "iteration": iteration,
            "images_seen": iteration * recipe.train.batch_size,
            "minutes": round((weights.stat().st_mtime - start) / 60, 2) if iteration else 0.0,
            "knn_top1_k20": knn["knn_top1_k20"],
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict[str, float]], pixels: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for axis, key, label in ((axes[0], "minutes", "minutes of training"), (axes[1], "images_seen", "images seen")):
        axis.plot([row[key] for row in rows], [100 * row["knn_top1_k20"] for row in rows], "o-", label="teacher")
        axis.axhline(100 * pixels, color="grey", linestyle="--", label="raw pixels")
        axis.axhline(100 * rows[0]["knn_top1_k20"], color="grey", linestyle=":", label="initialisation")
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("kNN top-1 (k=20), %")
    axes[1].legend(loc="best", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    write_atomically(path, lambda partial: figure.savefig(partial, dpi=80, format="png"))
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    check_arguments(arguments)
    recipe = load_recipe(arguments.recipe, arguments.overrides)
    overrides = arguments.overrides + budget_overrides(recipe, arguments.iterations, arguments.every)
    overrides += [f"evaluation.knn_max_train_images={arguments.knn_train}"]
    overrides += [f"evaluation.knn_max_test_images={arguments.knn_test}"]
    recipe = load_recipe(arguments.recipe, overrides)
    output = arguments.output
    output.mkdir(parents=True)
    data, root = arguments.data, arguments.knn_data
    if arguments.fashion_mnist is not None:
        from dinov2.data.fashion_mnist import write_image_folder

        root = write_image_folder(output / "fashion_mnist", arguments.fashion_mnist, 100)
        data = root / "train"
    run = output / "run"
    start = train(arguments, overrides, run, data)
    pixels = pixel_knn(root, recipe)
    rows = curve_rows(run, root, recipe, start)
    statistics = collapse_statistics(read_history(run / "plots" / "train.csv"), recipe)
    monitor = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    summary = {
        "recipe": recipe.name,
        "overrides": arguments.overrides,
        "iterations": rows[-1]["iteration"],
        "minutes": rows[-1]["minutes"],
        "knn_top1_k20_raw_pixels": pixels,
        "knn_top1_k20_init": rows[0]["knn_top1_k20"],
        "knn_top1_k20": rows[-1]["knn_top1_k20"],
        "collapsed_iterations": {k: v for k, v in monitor.items() if k.endswith("_collapsed_iterations")},
        **statistics,
    }
    columns = ["iteration", "images_seen", "minutes", "knn_top1_k20"]
    lines = [",".join(columns)] + [",".join(str(row[c]) for c in columns) for row in rows]
    write_atomically(output / "curve.csv", lambda partial: partial.write_text("\n".join(lines) + "\n"))
    title = f"{recipe.name} {' '.join(arguments.overrides)}"
    plot(rows, pixels, title, output / "curve.png")
    write_json(summary, output / "summary.json", sort_keys=False)
    print(json.dumps(summary))  # one line: the last line a caller parses
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
