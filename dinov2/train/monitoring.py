"""What a training run records besides MLflow: ``plots/train.csv`` and the kNN accuracy of its backbones."""

from pathlib import Path

import torch

from dinov2.configuration.recipes import Recipe


class MetricsHistory:
    """``plots/train.csv``: one row per iteration (``step`` then every logged value), for DVC plots and
    the report. A resumed run drops the rows after its checkpoint, so each step appears once."""

    def __init__(self, path: Path, start: int, enabled: bool):
        self.path, self.columns, self.handle = path, None, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and start > 0:
            lines = path.read_text().splitlines()
            if lines:
                self.columns = lines[0].split(",")[1:]
                kept = [line for line in lines[1:] if int(line.split(",")[0]) <= start]
                kept.insert(0, lines[0])
        path.write_text("".join(f"{line}\n" for line in kept))
        self.handle = path.open("a")

    def append(self, step: int, values: dict[str, float]) -> None:
        if self.handle is None:
            return
        if self.columns is None:
            self.columns = sorted(values)
            self.handle.write(",".join(["step", *self.columns]) + "\n")
        self.handle.write(
            ",".join([str(step), *(f"{values.get(key, float('nan')):.6g}" for key in self.columns)]) + "\n"
        )
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def backbone_knn(backbone: torch.nn.Module, root: Path, recipe: Recipe, device: torch.device) -> dict[str, float]:
    """Weighted kNN (the evaluation suite's) of a backbone's CLS token on <root>/train vs <root>/test."""
    from dinov2.data.transforms import make_eval_transform
    from dinov2.eval.datasets import LabelledImageFolder
    from dinov2.eval.features import extract_features
    from dinov2.eval.knn import knn_classify

    size = recipe.crops.global_crops_size
    transform = make_eval_transform(resize_size=size, crop_size=size)

    def subset(split: str, limit: int):
        dataset = LabelledImageFolder(root / split, transform=transform)
        stride = max(len(dataset) // limit, 1)
        return torch.utils.data.Subset(dataset, list(range(0, len(dataset), stride))[:limit])

    evaluation = recipe.evaluation
    train_features, train_labels = extract_features(
        backbone, subset("train", evaluation.knn_max_train_images), device=device
    )
    test_features, test_labels = extract_features(
        backbone, subset("test", evaluation.knn_max_test_images), device=device
    )
    return knn_classify(train_features, train_labels, test_features, test_labels, ks=(10, 20))


def knn_metrics(objective, root: Path, recipe: Recipe, device: torch.device, suffix: str = "") -> dict[str, float]:
    """kNN top-1 of each of the objective's backbones (``knn_backbones``), keyed ``<prefix><metric><suffix>``."""
    metrics = {}
    for prefix, backbone in objective.knn_backbones().items():
        for key, value in backbone_knn(backbone, root, recipe, device).items():
            metrics[f"{prefix}{key}{suffix}"] = value
    return metrics
