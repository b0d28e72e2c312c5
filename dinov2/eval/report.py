"""The results of one evaluation run: metrics JSON for DVC, MLflow keys, and a Markdown report with plots."""

import math
from pathlib import Path

from dinov2.atomic import write_json
from dinov2.eval.suite import SuiteResult


def mlflow_metrics(result: SuiteResult) -> dict[str, float]:
    """Stable MLflow keys, ``eval/<dataset>/<metric>`` (``knn_top1_k20``: MLflow refuses '@')."""
    keyed = {f"eval/{result.dataset}/{key}": value for key, value in result.metrics.items()}
    keyed.update({f"eval/{result.dataset}/seconds_{key}": value for key, value in result.seconds.items()})
    return keyed


def write_metrics_json(result: SuiteResult, backbone: str, path: Path) -> Path:
    payload = {"backbone": backbone, result.dataset: dict(sorted(result.metrics.items()))}
    return write_json(payload, path, sort_keys=False)


def _plot_knn(result: SuiteResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    knn = result.details["knn"]
    ks = sorted(int(key.removeprefix("knn_top1_k")) for key in knn if key.startswith("knn_top1_k"))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(ks, [100 * knn[f"knn_top1_k{k}"] for k in ks], "o-", label="top-1")
    axis.plot(ks, [100 * knn[f"knn_top5_k{k}"] for k in ks], "s--", label="top-5")
    axis.set(xscale="log", xlabel="k", ylabel="accuracy (%)", title=f"kNN on {result.dataset}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_linear_grid(result: SuiteResult, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    linear = result.details["linear"]
    views, rates = linear["views"], linear["learning_rates"]
    grid = np.array([[100 * linear["val_top1"][f"{view}_lr{rate:g}"] for rate in rates] for view in views])
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.5 * len(views)))
    image = axis.imshow(grid, aspect="auto", cmap="viridis")
    axis.set_xticks(range(len(rates)), [f"{rate:g}" for rate in rates], rotation=45)
    axis.set_yticks(range(len(views)), views)
    axis.set(xlabel="learning rate", title="linear probe: validation top-1 (%) per head")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _format(value: float) -> str:
    if 0 <= value <= 1:
        return f"{100 * value:.2f}%"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def write_report(result: SuiteResult, backbone: str, folder: Path) -> Path:
    """``report.md`` plus the plots and pictures it shows, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# Evaluation of `{backbone}` on `{result.dataset}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_format(value)} |" for key, value in sorted(result.metrics.items())]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {key} | {value:.1f} |" for key, value in result.seconds.items()]
    if "linear" in result.details:
        linear = result.details["linear"]
        lines += ["", f"Linear probe: selected `{linear['selected_view']}` at lr {linear['selected_learning_rate']:g}"
                  " on a validation split carved from train; the test split scored that head only."]  # fmt: skip
    if "logreg" in result.details:
        lines += ["", f"Logistic regression: C = {result.details['logreg']['selected_c']:.3g} chosen on 10% of train."]
    if result.notes:
        lines += ["", *(f"- {note}" for note in result.notes)]
    lines.append(f"\nUnreadable images skipped: {result.details.get('skipped_images', 0)}.")
    if "knn" in result.details:
        _plot_knn(result, folder / "knn_vs_k.png")
        lines += ["", "![kNN accuracy vs k](knn_vs_k.png)"]
    if "linear" in result.details:
        _plot_linear_grid(result, folder / "linear_grid.png")
        lines += ["", "![linear probe grid](linear_grid.png)"]
    for name, picture in result.pictures.items():
        picture.save(folder / f"{name}.png")
        lines += ["", f"![{name}]({name}.png)"]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
