"""Copy detection by edit family: the trained descriptor against the copy descriptor and raw pixels.

For each data set, a pool of real images gets planted copies: for every edit family and strength (a "cell"),
``--copies`` copies of distinct pool images; plus ``--copies`` copies of evaluation images at the goal strength
(crop to 70-95%, rotation up to 12 degrees, brightness and contrast x0.7-1.3, JPEG 50, mirrored half the time).
The pool (with its copies) is written as PNG files, a manifest is built, and ``train_descriptor`` trains and
calibrates the descriptor on it, exactly as ``dinov2 train-descriptor`` does. Then, for each descriptor:

- self-dedup at its self threshold: recall per cell (a copy whose cosine to its original reaches the
  threshold) and pairwise precision (of all pool pairs at or above it, the share that are an original and
  its copy, or two copies of one original);
- relative dedup at its relative threshold, evaluation images embedded with the pipeline's default views
  (centre crops 0.9 and 0.8): the share of the evaluation copies removed and of the other pool images removed;
- the trained descriptor's embedding throughput: through ``embed_manifest`` (decoding in 2 DataLoader
  workers, as ``dinov2 embed``) and in-process on decoded images.

Thresholds: the trained descriptor's calibrated ones; the copy descriptor's own (0.825 / 0.75) and the ones the
same calibration gives it; for raw pixels (resized to the input size, mean-centred, unit norm) the calibrated
ones. Descriptors are rounded to float16, as ``dinov2 embed`` stores them.

    .venv/bin/python benchmarks/curation/bench_descriptors.py --dataset fashion_mnist
    .venv/bin/python benchmarks/curation/bench_descriptors.py --dataset cifar10 --cifar-archive cifar10-jpeg.tar.gz
"""

import argparse
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from dinov2.atomic import write_table
from dinov2.configuration import validate
from dinov2.configuration.curation import DescriptorParams
from dinov2.copydetect.calibration import calibrate
from dinov2.copydetect.copy_descriptor import COPY_DESCRIPTOR_THRESHOLDS, copy_descriptor
from dinov2.copydetect.edits import apply_edits, crop_fraction, draw_edits, jpeg_recompressed
from dinov2.copydetect.stage import calibration_copies, held_out_rows, train_descriptor
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import embed_manifest, load_embeddings
from dinov2.curation.manifest import build_manifest, read_manifest
from dinov2.curation.views import expand, parse_views
from dinov2.data.fashion_mnist import load_fashion_mnist

EVAL_VIEWS = ["centre_crop:0.9", "centre_crop:0.8"]
Edit = Callable[[Image.Image, np.random.Generator], Image.Image]


def cropped(kept: float) -> Edit:
    return lambda image, rng: crop_fraction(image, kept, kept, rng).resize(image.size, Image.BICUBIC)


def rotated(degrees: float) -> Edit:
    return lambda image, rng: image.rotate(degrees * rng.choice([-1, 1]), Image.BILINEAR, fillcolor=(0, 0, 0))


def recoloured(change: float) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for kind in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = kind(image).enhance(1 + change * rng.choice([-1, 1]))
        return image

    return edit


def overlaid(size: float) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        from PIL import ImageDraw

        image = image.copy()
        extent = max(2, round(min(image.size) * size))
        left = int(rng.integers(0, image.width - extent + 1))
        top = int(rng.integers(0, image.height - extent + 1))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            ImageDraw.Draw(image).ellipse((left, top, left + extent, top + extent), fill=colour)
        else:
            ImageDraw.Draw(image).text((left, top), "copy", fill=colour)
        return image

    return edit


def padded(fraction: float) -> Edit:
    def edit(image: Image.Image, rng: np.random.Generator) -> Image.Image:
        border = round(min(image.size) * fraction)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        return ImageOps.expand(image, border=border, fill=colour).resize(image.size, Image.BICUBIC)

    return edit


def strength_copy(image: Image.Image, rng: np.random.Generator, strength: str) -> Image.Image:
    """A copy at one of the calibration strengths of ``descriptor.calibration.copies``."""
    return apply_edits(image, draw_edits(rng, image.size, DescriptorParams().calibration.copies[strength]))


CELLS: dict[str, Edit] = {
    "crop 0.9": cropped(0.9),
    "crop 0.8": cropped(0.8),
    "crop 0.7": cropped(0.7),
    "rotate 5": rotated(5),
    "rotate 10": rotated(10),
    "rotate 15": rotated(15),
    "flip": lambda image, rng: ImageOps.mirror(image),
    "colour 0.2": recoloured(0.2),
    "colour 0.4": recoloured(0.4),
    "jpeg 70": lambda image, rng: jpeg_recompressed(image, 70),
    "jpeg 50": lambda image, rng: jpeg_recompressed(image, 50),
    "jpeg 30": lambda image, rng: jpeg_recompressed(image, 30),
    "blur 0.5": lambda image, rng: image.filter(ImageFilter.GaussianBlur(0.5)),
    "blur 1.0": lambda image, rng: image.filter(ImageFilter.GaussianBlur(1.0)),
    "overlay 0.2": overlaid(0.2),
    "overlay 0.35": overlaid(0.35),
    "padding 0.1": padded(0.1),
    "padding 0.2": padded(0.2),
    "planted (prepare-default)": lambda image, rng: strength_copy(image, rng, "planted"),
    "goal: crop 0.7 + rotate 12 + colour + jpeg 50": lambda image, rng: strength_copy(image, rng, "strong"),
}
GOAL_CELL = "goal: crop 0.7 + rotate 12 + colour + jpeg 50"


def load_dataset(name: str, pool_size: int, eval_size: int, cifar_archive: Path | None, work: Path, seed: int):
    """(pool images, evaluation images) as RGB, drawn with ``seed`` from the train and test splits."""
    rng = np.random.default_rng(seed)
    if name == "fashion_mnist":
        train, _ = load_fashion_mnist(train=True)
        test, _ = load_fashion_mnist(train=False)
        pool = [Image.fromarray(train[i]).convert("RGB") for i in rng.choice(len(train), pool_size, replace=False)]
        evaluation = [Image.fromarray(test[i]).convert("RGB") for i in rng.choice(len(test), eval_size, replace=False)]
        return pool, evaluation
    if cifar_archive is None:
        raise SystemExit("--cifar-archive is required for cifar10")
    with tarfile.open(cifar_archive) as archive:
        archive.extractall(work / "cifar", filter="data")
    root = next((work / "cifar").rglob("train")).parent
    train_files = sorted((root / "train").rglob("*.jpg"))
    test_files = sorted((root / "test").rglob("*.jpg"))
    pool = [Image.open(train_files[i]).convert("RGB") for i in rng.choice(len(train_files), pool_size, replace=False)]
    evaluation = [
        Image.open(test_files[i]).convert("RGB") for i in rng.choice(len(test_files), eval_size, replace=False)
    ]
    return pool, evaluation


def plant(pool: list[Image.Image], evaluation: list[Image.Image], copies: int, seed: int):
    """Pool images then planted copies; ``family[i]`` = the pool index of image i's original (-1 - e for a copy
    of evaluation image e); ``cell[i]`` = the cell of a planted copy, '' for a pool image."""
    rng = np.random.default_rng(seed + 1)
    images, family, cell = list(pool), list(range(len(pool))), [""] * len(pool)
    for name, edit in CELLS.items():
        for original in rng.choice(len(pool), copies, replace=False):
            images.append(edit(pool[original], rng))
            family.append(int(original))
            cell.append(name)
    eval_copied = rng.choice(len(evaluation), copies, replace=False)
    for original in eval_copied:
        images.append(CELLS[GOAL_CELL](evaluation[original], rng))
        family.append(-1 - int(original))
        cell.append("eval copy")
    return images, np.array(family), np.array(cell)


def raw_pixels(side: int) -> Callable[[Image.Image], np.ndarray]:
    def describe(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB").resize((side, side), Image.BILINEAR), dtype=np.float32).ravel()
        pixels -= pixels.mean()
        return pixels / max(float(np.linalg.norm(pixels)), 1e-8)

    return describe


def stored(vectors: np.ndarray) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float16).astype(np.float32)


def pairs_at_or_above(vectors: np.ndarray, family: np.ndarray, threshold: float) -> tuple[int, int]:
    """(all pairs, true pairs) of the pool at or above the threshold, counted in row blocks."""
    linked = true = 0
    for start in range(0, len(vectors), 1024):
        block = vectors[start : start + 1024] @ vectors.T
        rows = np.arange(start, min(start + 1024, len(vectors)))
        upper = np.arange(len(vectors))[None, :] > rows[:, None]
        hit = (block >= threshold) & upper
        linked += int(hit.sum())
        true += int((hit & (family[rows][:, None] == family[None, :])).sum())
    return linked, true


def score(vectors, eval_vectors, family, cell, thresholds) -> dict:
    vectors, eval_vectors = stored(vectors), stored(eval_vectors)
    self_t, relative_t = thresholds["self"], thresholds["relative"]
    result = {"thresholds": thresholds, "recall": {}}
    for name in CELLS:
        rows = np.flatnonzero(cell == name)
        own = np.einsum("ij,ij->i", vectors[rows], vectors[family[rows]])
        result["recall"][name] = float((own >= self_t).mean())
    linked, true = pairs_at_or_above(vectors, family, self_t)
    result["pairs_linked"], result["pairs_true"] = linked, true
    result["pairwise_precision"] = true / linked if linked else 1.0
    nearest_eval = np.max(vectors @ eval_vectors.T, axis=1)
    removed = nearest_eval >= relative_t
    eval_copies = cell == "eval copy"
    result["eval_copies_removed"] = float(removed[eval_copies].mean())
    result["unrelated_removed"] = float(removed[~eval_copies].mean())
    result["at_goal"] = at_goal(vectors, nearest_eval, family, cell)
    return result


def cosine_finding(cosines: np.ndarray, share: float) -> float:
    """The highest threshold at which at least ``share`` of these cosines are at or above it."""
    ranked = np.sort(cosines)[::-1]
    return float(ranked[int(np.ceil(share * len(ranked))) - 1])


def at_goal(vectors: np.ndarray, nearest_eval: np.ndarray, family: np.ndarray, cell: np.ndarray) -> dict:
    """Whatever the calibration chose: the precision at the self threshold that finds 90% of the goal-strength
    copies, and the unrelated removals at the relative threshold that removes 95% of the evaluation copies."""
    rows = np.flatnonzero(cell == GOAL_CELL)
    self_t = cosine_finding(np.einsum("ij,ij->i", vectors[rows], vectors[family[rows]]), 0.9)
    linked, true = pairs_at_or_above(vectors, family, self_t)
    eval_copies = cell == "eval copy"
    relative_t = cosine_finding(nearest_eval[eval_copies], 0.95)
    return {
        "self_threshold": self_t,
        "pairwise_precision": true / linked if linked else 1.0,
        "pairs_linked": linked,
        "relative_threshold": relative_t,
        "unrelated_removed": float((nearest_eval[~eval_copies] >= relative_t).mean()),
    }


def calibrated_thresholds(describe_all, images: list, paths: list[str], params: DescriptorParams) -> dict:
    """The thresholds ``train_descriptor``'s calibration gives another descriptor: same rows, copies, targets."""
    held_out, training = held_out_rows(params.calibration.images, len(paths), params.seed)
    originals = [images[i] for i in held_out]
    copies, strengths = calibration_copies(originals, params.seed, params.calibration.copies)
    pool = [images[i] for i in training[: params.calibration.pool_images]]
    result = calibrate(
        describe_all(originals),
        describe_all(copies),
        strengths,
        describe_all(pool),
        params.calibration.self_precision,
        params.calibration.relative_false_removal,
    )
    return {"self": result.self_threshold, "relative": result.relative_threshold}


def with_views(images: list[Image.Image]) -> list[Image.Image]:
    views = parse_views(EVAL_VIEWS)
    return [view for image in images for view in [image, *expand(image, views)]]


def run(dataset: str, args, params: DescriptorParams, work: Path) -> dict:
    pool, evaluation = load_dataset(dataset, args.pool, args.eval, args.cifar_archive, work, args.seed)
    images, family, cell = plant(pool, evaluation, args.copies, args.seed)
    folder = work / dataset / "pool"
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index:06d}.png")
    built = build_manifest(folder, dataset, "pool")
    manifest = write_table(built.table, work / dataset / "manifest.parquet")
    paths = read_manifest(manifest).column("path").to_pylist()
    # Manifest row r is image order[r]; an exact copy of another file (a mirrored symmetric image) is collapsed.
    order = [int(Path(path).stem) for path in paths]
    images, family, cell = [images[i] for i in order], remap(family[order], order, len(images)), cell[order]
    logging.info(
        "%s: %d pool images (%d planted), %d eval images", dataset, len(images), (cell != "").sum(), len(evaluation)
    )

    started = time.perf_counter()
    descriptor_folder = work / dataset / "descriptor"
    metrics = train_descriptor(paths, str(manifest), descriptor_folder, params)
    train_seconds = time.perf_counter() - started
    trained = build_embedder(f"descriptor:{descriptor_folder}", device="cpu")
    meta = json.loads((descriptor_folder / "descriptor.json").read_text())

    def trained_vectors(batch: list[Image.Image]) -> np.ndarray:
        return np.concatenate([trained.embed(batch[i : i + 256]) for i in range(0, len(batch), 256)])

    pixels = raw_pixels(params.input_size)
    descriptors = {
        "trained": trained_vectors,
        "copy_descriptor": lambda batch: np.stack([copy_descriptor(image) for image in batch]),
        "raw_pixels": lambda batch: np.stack([pixels(image) for image in batch]),
    }
    results = {}
    eval_views = with_views(evaluation)
    for name, describe_all in descriptors.items():
        vectors, eval_vectors = describe_all(images), describe_all(eval_views)
        threshold_sets = {}
        if name == "trained":
            threshold_sets["calibrated"] = meta["thresholds"]
        else:
            threshold_sets["calibrated"] = calibrated_thresholds(describe_all, images, paths, params)
        if name == "copy_descriptor":
            threshold_sets["own"] = dict(COPY_DESCRIPTOR_THRESHOLDS)
        for label, thresholds in threshold_sets.items():
            results[f"{name} ({label})"] = score(vectors, eval_vectors, family, cell, thresholds)
            logging.info("%s (%s): %s", name, label, json.dumps(results[f"{name} ({label})"]))

    throughput = {}
    torch.set_num_threads(2)
    started = time.perf_counter()
    summary = embed_manifest(
        manifest, work / dataset / "embedded", trained, batch_size=256, shard_size=10_000, num_workers=2
    )
    throughput["embed_manifest, 2 workers"] = summary["embedded"] / (time.perf_counter() - started)
    load_embeddings(work / dataset / "embedded")
    started = time.perf_counter()
    trained_vectors(images)
    throughput["in-process, decoded images"] = len(images) / (time.perf_counter() - started)
    started = time.perf_counter()
    descriptors["copy_descriptor"](images)
    throughput["copy_descriptor, in-process"] = len(images) / (time.perf_counter() - started)
    return {
        "dataset": dataset,
        "pool_images": len(images),
        "eval_images": len(evaluation),
        "copies_per_cell": args.copies,
        "train_seconds": round(train_seconds, 1),
        "descriptor_metrics": metrics,
        "results": results,
        "images_per_second": {key: round(value, 1) for key, value in throughput.items()},
    }


def remap(family: np.ndarray, order: list[int], made: int) -> np.ndarray:
    """Indices of originals (in the order images were made) to manifest rows; every original has a row."""
    row_of = np.full(made, -1, dtype=np.int64)
    row_of[np.asarray(order)] = np.arange(len(order))
    rows = np.where(family >= 0, row_of[np.maximum(family, 0)], family)
    assert not ((family >= 0) & (rows < 0)).any(), "an original was collapsed into another file"
    return rows


def table(report: dict) -> str:
    names = list(report["results"])
    lines = ["| cell | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name in CELLS:
        lines.append(f"| {name} | " + " | ".join(f"{report['results'][n]['recall'][name]:.2f}" for n in names) + " |")
    rows = [
        ("self threshold", lambda r: f"{r['thresholds']['self']:.4f}"),
        ("pairwise precision", lambda r: f"{r['pairwise_precision']:.3f} ({r['pairs_true']}/{r['pairs_linked']})"),
        ("relative threshold", lambda r: f"{r['thresholds']['relative']:.4f}"),
        ("eval copies removed", lambda r: f"{r['eval_copies_removed']:.3f}"),
        ("unrelated pool removed", lambda r: f"{r['unrelated_removed']:.4f}"),
        ("self threshold for 0.9 goal recall", lambda r: f"{r['at_goal']['self_threshold']:.4f}"),
        ("pairwise precision there", lambda r: f"{r['at_goal']['pairwise_precision']:.3f}"),
        ("relative threshold removing 0.95 of eval copies", lambda r: f"{r['at_goal']['relative_threshold']:.4f}"),
        ("unrelated pool removed there", lambda r: f"{r['at_goal']['unrelated_removed']:.4f}"),
    ]
    for label, cell_text in rows:
        lines.append(f"| **{label}** | " + " | ".join(cell_text(report["results"][n]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion_mnist", "cifar10"], default="fashion_mnist")
    parser.add_argument("--cifar-archive", type=Path, help="cifar10-jpeg.tar.gz (ImageFolder of 32 px JPEGs)")
    parser.add_argument("--pool", type=int, default=5000, help="pool images drawn from the train split")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation images drawn from the test split")
    parser.add_argument("--copies", type=int, default=100, help="planted copies per cell")
    parser.add_argument("--params", type=Path, help="a params.yaml-style file whose descriptor section is used")
    parser.add_argument("--set", action="append", default=[], help="descriptor key=value (YAML value), repeatable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    section = yaml.safe_load(args.params.read_text()).get("descriptor", {}) if args.params else {}
    section.setdefault("input_size", 28 if args.dataset == "fashion_mnist" else 32)
    for assignment in args.set:
        key, _, value = assignment.partition("=")
        *parents, leaf = key.split(".")
        target = section
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    params = validate(DescriptorParams, section, "descriptor")
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        report = run(args.dataset, args, params, work)
    report["params"] = params.model_dump(mode="json")
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=2))
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
