"""How far a pipeline run's pool holds near-duplicates that nobody planted, and what that does to the
precision of self-dedup as the ground truth scores it.

Reads a finished pipeline run (``--outputs``, default ``outputs``): the pool's dedup embeddings
(``embed/pool``), their manifest and ``prepare/ground_truth.parquet``. A pair is *planted* when both
images belong to one family (an original and its planted copies). For every pair of pool images above
``--candidate-cosine`` in the embeddings it measures

- the embeddings' cosine, as dedup thresholds it;
- the best normalised cross-correlation of the grey pixels (at ``--side`` px) over a grid of the edits
  ``prepare`` plants (mirror, rotation, crops kept at 80-100% at a 3 x 3 grid of offsets), in both
  directions: a verification a person would reach for when the embedding is not precise enough;
- the plain pixel correlation, no edit undone: pairs of *unplanted* images above ``--natural-ncc`` are
  near-duplicates of the data itself (Fashion-MNIST holds many: the same trousers photographed alike).

It prints one JSON object: the pair precision each score reaches at pair recall 0.8 / 0.9 / 0.95, the
quantiles of the verification score over planted and unplanted pairs, and the unplanted pairs above
``--natural-ncc`` by the kind of their images; ``--grid FILE`` saves the unplanted pairs that score
highest side by side.

    python benchmarks/curation/natural_duplicates.py --outputs outputs --grid natural_duplicates.png
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dinov2.copydetect.edits import Edit  # noqa: E402
from dinov2.curation.embeddings import load_embeddings  # noqa: E402

RECALLS = (0.8, 0.9, 0.95)
ROTATIONS = (-8, -4, 0, 4, 8)
KEPT = (0.8, 0.875, 0.95, 1.0)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="a finished pipeline run's outputs/")
    parser.add_argument("--candidate-cosine", type=float, default=0.75, help="pairs scored: cosine at least this")
    parser.add_argument("--natural-ncc", type=float, default=0.97, help="unplanted pairs this alike are natural")
    parser.add_argument("--side", type=int, default=28, help="pixel side the images are compared at")
    parser.add_argument("--grid", type=Path, help="PNG of the 8 unplanted pairs the verification scores highest")
    return parser.parse_args(argv)


def edited_views(image: Image.Image, side: int) -> np.ndarray:
    """The image under every combination of the grid's edits (``prepare``'s own ``Edit``), flattened:
    (views, side * side)."""
    views = []
    for mirrored in (False, True):
        base = Edit("flip").apply(image) if mirrored else image
        for degrees in ROTATIONS:
            turned = Edit("rotate", degrees).apply(base) if degrees else base
            for kept in KEPT:
                inner = round(side * kept)
                offsets = sorted({0, (side - inner) // 2, side - inner})
                for left in offsets:
                    for top in offsets:
                        edited = Edit("crop", kept, (left, top)).apply(turned) if kept < 1.0 else turned
                        views.append(np.asarray(edited, dtype=np.float32).ravel())
    return np.stack(views)


def correlation(rows: np.ndarray, target: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    target = target - target.mean()
    return rows @ target / (np.linalg.norm(rows, axis=1) * np.linalg.norm(target) + 1e-6)


def precision_at_recalls(scores: np.ndarray, planted: np.ndarray, positives: int) -> dict[str, dict[str, float]]:
    """Pair precision (and the score threshold) where the pairs ranked by ``scores`` first reach each recall
    of the ``positives`` planted pairs (pairs below the candidate cosine count as missed)."""
    order = np.argsort(-scores)
    found = np.cumsum(planted[order])
    precision = found / np.arange(1, len(order) + 1)
    recall = found / positives
    result = {}
    for target in RECALLS:
        at = int(np.searchsorted(recall, target))
        result[f"recall_{target}"] = (
            {"precision": round(float(precision[at]), 4), "threshold": round(float(scores[order][at]), 4)}
            if at < len(order)
            else {"precision": None, "threshold": None}
        )
    return result


def main(argv: list[str] | None = None) -> dict:
    arguments = parse_arguments(argv)
    outputs = arguments.outputs
    for needed in (outputs / "embed" / "pool" / "embeddings.json", outputs / "prepare" / "ground_truth.parquet"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: run the pipeline (dvc repro dedup) first")
    embeddings = load_embeddings(outputs / "embed" / "pool")
    ids = list(embeddings.ids)
    vectors = np.asarray(embeddings.vectors, dtype=np.float32)
    manifest = embeddings.manifest.select(["id", "path"]).to_pydict()
    paths = dict(zip(manifest["id"], manifest["path"], strict=True))
    family = {}
    for row in pq.read_table(outputs / "prepare" / "ground_truth.parquet").to_pylist():
        if row["kind"] == "pool_duplicate":
            family[row["id"]] = row["original_id"]
            family.setdefault(row["original_id"], row["original_id"])
    family_index = np.array([hash(family[i]) if i in family else -(n + 1) for n, i in enumerate(ids)])

    similarity = vectors @ vectors.T
    first, second = np.triu_indices(len(ids), 1)
    positives = int((family_index[first] == family_index[second]).sum())
    cosine = similarity[first, second]
    chosen = np.nonzero(cosine >= arguments.candidate_cosine)[0]
    first, second, cosine = first[chosen], second[chosen], cosine[chosen]
    planted = family_index[first] == family_index[second]

    side = arguments.side
    images: dict[int, Image.Image] = {}

    def grey(index: int) -> Image.Image:
        if index not in images:
            images[index] = Image.open(paths[ids[index]]).convert("L").resize((side, side), Image.BICUBIC)
        return images[index]

    verified, plain = np.empty(len(chosen)), np.empty(len(chosen))
    for n, (a, b) in enumerate(zip(first, second, strict=True)):
        pixels_a = np.asarray(grey(a), dtype=np.float32).ravel()
        pixels_b = np.asarray(grey(b), dtype=np.float32).ravel()
        verified[n] = max(
            correlation(edited_views(grey(a), side), pixels_b).max(),
            correlation(edited_views(grey(b), side), pixels_a).max(),
        )
        plain[n] = correlation(pixels_a[None], pixels_b)[0]

    def kind(index: int) -> str:
        return ids[index].split("/")[1] if ids[index].count("/") >= 2 else ids[index].split("/")[0]

    natural = Counter(
        "+".join(sorted((kind(a), kind(b))))
        for a, b, alike, same in zip(first, second, plain, planted, strict=True)
        if alike >= arguments.natural_ncc and not same
    )
    summary = {
        "outputs": str(outputs),
        "embedder": embeddings.embedder,
        "pool_images": len(ids),
        "planted_pairs": positives,
        "candidate_pairs": len(chosen),
        "planted_pairs_among_candidates": int(planted.sum()),
        "cosine": precision_at_recalls(cosine, planted, positives),
        "pixel_verification": precision_at_recalls(verified, planted, positives),
        "verification_quantiles_planted": np.quantile(verified[planted], [0.05, 0.5]).round(4).tolist(),
        "verification_quantiles_unplanted": np.quantile(verified[~planted], [0.95, 0.99, 1.0]).round(4).tolist(),
        f"unplanted_pairs_plain_ncc_at_least_{arguments.natural_ncc}": dict(natural),
    }
    if arguments.grid is not None:
        unplanted = np.nonzero(~planted)[0]
        top = unplanted[np.argsort(-verified[unplanted])[:8]]
        rows = [
            np.concatenate([np.asarray(grey(first[k])), np.full((side, 2), 255), np.asarray(grey(second[k]))], axis=1)
            for k in top
        ]
        grid = np.concatenate([np.pad(row, 2, constant_values=128) for row in rows], axis=0).astype(np.uint8)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(arguments.grid)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
