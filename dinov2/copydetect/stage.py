"""``dinov2 train-descriptor`` as a library call: train on a pool's images, calibrate, write the descriptor folder.

1. ``calibration.images`` pool images, drawn with ``seed``, are held out; the network trains on the rest.
2. Each held-out image gets one synthetic copy, its strength (``calibration.copies``) taken in turn
   (``edits.draw_edits``); the held-out images, their copies and up to ``calibration.pool_images`` training
   images are embedded, rounded to float16, and the thresholds are chosen (``calibration.py``).
3. The folder (``network.py``) is written under ``.<out>.partial`` and renamed when complete, with
   ``metrics.json`` and ``plots/`` (``train.csv``: the losses per step; ``calibration.png``).
"""

import csv
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dinov2.atomic import output_folder, write_json
from dinov2.configuration.curation import CopyEditRanges, DescriptorParams
from dinov2.copydetect.calibration import Calibration, calibrate
from dinov2.copydetect.edits import apply_edits, draw_edits
from dinov2.copydetect.network import CopyDetector, write_descriptor
from dinov2.copydetect.training import describe, fit, load_image

logger = logging.getLogger(__name__)


def calibration_copies(originals: Sequence, seed: int, copies: dict[str, CopyEditRanges]) -> tuple[list, list[str]]:
    """One copy of each original, the strengths taken in turn; copy i drawn from a generator seeded by (seed, i)."""
    names = list(copies)
    strengths = [names[i % len(names)] for i in range(len(originals))]
    edited = [
        apply_edits(image, draw_edits(np.random.default_rng((seed, i)), image.size, copies[strength]))
        for i, (image, strength) in enumerate(zip(originals, strengths, strict=True))
    ]
    return edited, strengths


def calibrate_model(
    model: CopyDetector, originals: Sequence, pool: Sequence, params: DescriptorParams, device: str = "cpu"
) -> tuple[Calibration, dict[str, np.ndarray]]:
    """Thresholds of ``model`` from held-out ``originals`` (RGB images), their synthetic copies and ``pool``
    images, to the targets of ``params.calibration``; also returns the descriptors, for plots."""
    targets = params.calibration
    copies, strengths = calibration_copies(originals, params.seed, targets.copies)
    model.to(device)
    vectors = {
        "originals": describe(model, originals, device),
        "copies": describe(model, copies, device),
        "pool": describe(model, pool, device),
    }
    model.cpu()
    result = calibrate(
        vectors["originals"], vectors["copies"], strengths, vectors["pool"], targets.self_precision,
        targets.relative_false_removal,
    )  # fmt: skip
    vectors["strengths"] = np.asarray(strengths)
    return result, vectors


def calibration_plot(calibration: Calibration, vectors: dict[str, np.ndarray], path: Path) -> None:
    """Cosine of every copy to its original (per strength) beside the highest cosine of every original to
    another original or pool image, with both thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    originals = vectors["originals"]
    own = np.einsum("ij,ij->i", originals, vectors["copies"])
    others = originals @ np.concatenate([originals, vectors["pool"]]).T
    np.fill_diagonal(others[:, : len(originals)], -1)
    figure, axes = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(min(own.min(), others.max(axis=1).min()), 1, 60)
    for strength in sorted(set(vectors["strengths"].tolist())):
        axes.hist(own[vectors["strengths"] == strength], bins, alpha=0.5, label=f"copy, {strength}")
    axes.hist(others.max(axis=1), bins, alpha=0.5, label="nearest other image")
    for name, value in (("self", calibration.self_threshold), ("relative", calibration.relative_threshold)):
        axes.axvline(value, linestyle="--", color="black" if name == "self" else "grey", label=f"{name} {value:.4f}")
    axes.set_xlabel("cosine to the held-out original")
    axes.set_ylabel("images")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def calibration_metrics(calibration: Calibration) -> dict[str, float]:
    metrics = {
        "descriptor/self_threshold": calibration.self_threshold,
        "descriptor/self_precision": calibration.self_precision,
        "descriptor/relative_threshold": calibration.relative_threshold,
        "descriptor/relative_false_removal": calibration.relative_false_removal,
    }
    for strength, value in calibration.self_recall.items():
        metrics["descriptor/self_recall" + ("" if strength == "all" else f"_{strength}")] = value
    for strength, value in calibration.relative_recall.items():
        metrics["descriptor/relative_recall" + ("" if strength == "all" else f"_{strength}")] = value
    return metrics


def check_inputs(paths: Sequence[str], source: str, params: DescriptorParams) -> None:
    """Every check that needs no training: enough images to hold some out for calibration and train on the rest."""
    held_out = params.calibration.images
    if len(paths) - held_out < 2:
        raise ValueError(
            f"{source} holds {len(paths)} images: too few to hold out descriptor.calibration.images = "
            f"{held_out} for calibration and train on the rest (at least 2)"
        )


def held_out_rows(count: int, total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Manifest rows held out for calibration and rows trained on, both sorted: a seeded draw."""
    order = np.random.default_rng(seed).permutation(total)
    return np.sort(order[:count]), np.sort(order[count:])


def train_descriptor(
    paths: Sequence[str],
    source: str,
    out: Path,
    params: DescriptorParams,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train on the images ``paths`` (of ``source``, a manifest), calibrate and write the descriptor folder
    ``out``; returns its metrics (also in metrics.json)."""
    check_inputs(paths, source, params)
    device = params.device or ("cuda" if torch.cuda.is_available() else "cpu")
    held_out, training = held_out_rows(params.calibration.images, len(paths), params.seed)
    logger.info(
        "training a copy descriptor on %d images of %s (%d held out for calibration), %d epochs",
        len(training), source, len(held_out), params.epochs,
    )  # fmt: skip
    schedule = params
    batch_size = min(schedule.batch_size, len(training))
    steps_per_epoch = len(training) // batch_size
    started = time.perf_counter()
    with tqdm(total=schedule.epochs * steps_per_epoch, desc="train-descriptor", unit="step") as bar:

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses['loss']:.3f}")
            if (step + 1) % steps_per_epoch == 0:
                seconds = time.perf_counter() - started
                logger.info(
                    "epoch %d/%d: loss %.4f (InfoNCE %.4f, entropy %.4f), %.1f images/s",
                    (step + 1) // steps_per_epoch,
                    schedule.epochs,
                    losses["loss"],
                    losses["info_nce"],
                    losses["entropy"],
                    (step + 1) * batch_size / seconds,
                )
            if on_step is not None:
                on_step(step, total, losses)

        model, history = fit([paths[i] for i in training], params, params.seed, device=device, on_step=progress)
    train_seconds = time.perf_counter() - started
    history_rows = [{"step": step, **losses} for step, losses in enumerate(history)]
    rate = len(history) * batch_size / train_seconds
    logger.info("trained in %.0f s (%.1f images/s, two views each)", train_seconds, rate)

    size = params.input_size
    originals = [load_image(paths[i], size, params.max_pixels) for i in held_out]
    scored = training[: params.calibration.pool_images]
    pool = [load_image(paths[i], size, params.max_pixels) for i in scored]
    calibration, vectors = calibrate_model(model, originals, pool, params, device)
    logger.info(
        "self-dedup threshold %.4f (precision %.3f, recall %s), relative %.4f (recall %s, false removal %.4f)",
        calibration.self_threshold,
        calibration.self_precision,
        {k: round(v, 3) for k, v in calibration.self_recall.items()},
        calibration.relative_threshold,
        {k: round(v, 3) for k, v in calibration.relative_recall.items()},
        calibration.relative_false_removal,
    )
    metrics = {
        "descriptor/train_images": len(training),
        "descriptor/held_out_images": len(held_out),
        "descriptor/steps": len(history),
        "descriptor/train_seconds": round(train_seconds, 1),
        "descriptor/final_loss": history[-1]["loss"],
        **calibration_metrics(calibration),
    }
    meta = {
        "thresholds": {"self": calibration.self_threshold, "relative": calibration.relative_threshold},
        "calibration": {
            "self_precision_target": params.calibration.self_precision,
            "relative_false_removal_target": params.calibration.relative_false_removal,
            "copy_strengths": list(params.calibration.copies),
            **calibration.as_dict(),
        },
        "training": {"manifest": source, "params": params.model_dump(mode="json"), "metrics": metrics},
    }
    with output_folder(out, ("plots",)) as folder:
        write_descriptor(model, meta, folder)
        with open(folder / "plots" / "train.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history_rows[0]))
            writer.writeheader()
            writer.writerows(history_rows)
        calibration_plot(calibration, vectors, folder / "plots" / "calibration.png")
        write_json(metrics, folder / "metrics.json")
    return metrics
