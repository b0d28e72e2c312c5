"""The dedup stage: self-dedup and relative dedup on a k-NN graph (paper appendix A.2-A.3).

One path, each step feeding the next: embeddings -> candidate graph (each image linked to those of its
k nearest neighbours whose cosine exceeds the threshold) -> verification (``dedup.verify``: the candidate
pairs whose aligned pixels agree, ``dinov2/copydetect/verify.py``) -> connected components -> kept.

- Self-dedup keeps one image per component, the first in a preference order (the best copy first,
  ``representatives.py``), so the result does not depend on the search backend's tie order.
- Relative dedup builds the same graph over the kept pool + every evaluation image (and its extra views)
  and drops every pool image whose component holds an evaluation image, so a chain of near-copies cannot
  smuggle a test image into pretraining. With verification, only pool-evaluation pairs link (the pool's own
  pairs were self-dedup's).

The stage speaks up when a result is almost certainly wrong rather than write it without a word: it refuses
a threshold calibrated for another model and a duplicate group that swallows the pool (``dedup.guards: warn``
turns these errors into warnings), and embeddings of different models.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinov2.atomic import output_folder, write_json, write_table
from dinov2.configuration.curation import DedupParams, IndexParams
from dinov2.copydetect.verify import verify_pairs
from dinov2.curation.components import connected_components
from dinov2.curation.embeddings import EmbeddingSet, check_same_model, load_embeddings
from dinov2.curation.index import VectorIndex, check_vectors
from dinov2.curation.report import image_grid
from dinov2.curation.representatives import kept_reason, preference_order

logger = logging.getLogger(__name__)


class CurationGuardError(ValueError):
    """A result that is almost certainly wrong: a threshold of another model, a group that swallows the pool."""


def check_threshold(threshold: float, name: str) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must be a cosine similarity in [0, 1], got {threshold}")
    return float(threshold)


def knn_edges(vectors: np.ndarray, k: int, threshold: float, index: IndexParams | None = None) -> np.ndarray:
    """(E, 2) edges i -> j between different images, j among the k nearest neighbours of i, cosine > threshold."""
    check_threshold(threshold, "threshold")
    if k < 2:
        raise ValueError(f"k must be at least 2 (the nearest neighbour of a vector is itself), got {k}")
    search = VectorIndex(vectors, index)
    sims, rows = search.search(search.vectors, k)
    linked = (sims > threshold) & (rows >= 0)
    sources = np.broadcast_to(np.arange(len(vectors))[:, None], rows.shape)
    edges = np.stack([sources[linked], rows[linked]], axis=1)
    return edges[edges[:, 0] != edges[:, 1]]


@dataclass
class SelfDedup:
    labels: np.ndarray  # component label (its smallest member) of every image
    keep: np.ndarray  # boolean mask: the representative of every component

    def counts(self) -> dict[str, int]:
        sizes = np.bincount(self.labels)
        return {
            "images": len(self.labels),
            "kept": int(self.keep.sum()),
            "removed": int((~self.keep).sum()),
            "duplicate_groups": int((sizes > 1).sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0,
        }

    def groups(self) -> list[np.ndarray]:
        """Members of every component with more than one image, largest first."""
        order = np.argsort(self.labels, kind="stable")
        starts = np.flatnonzero(np.diff(self.labels[order], prepend=-1))
        members = np.split(order, starts[1:])
        return sorted((m for m in members if len(m) > 1), key=lambda m: (-len(m), m[0]))


def keep_one_per_component(n: int, edges: np.ndarray, preference: np.ndarray | None = None) -> SelfDedup:
    """Components of the graph; ``preference[i]`` ranks image i (0 = best), the best of each is kept."""
    preference = np.arange(n) if preference is None else np.asarray(preference, dtype=np.int64)
    if preference.shape != (n,) or len(np.unique(preference)) != n:
        raise ValueError(f"preference must rank the {n} images with {n} distinct numbers, got shape {preference.shape}")
    labels = connected_components(n, edges)
    best = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(best, labels, preference)
    return SelfDedup(labels, preference == best[labels])


def untouched(n_pool: int, n_total: int, edges: np.ndarray) -> np.ndarray:
    """Mask over the first ``n_pool`` of ``n_total`` rows: True where the row's component holds none of the
    other rows (the evaluation images)."""
    labels = connected_components(n_total, edges)
    tainted = np.zeros(n_total, dtype=bool)
    tainted[np.unique(labels[n_pool:])] = True
    return ~tainted[labels[:n_pool]]


def self_dedup(
    vectors: np.ndarray,
    k: int,
    threshold: float,
    index: IndexParams | None = None,
    preference: np.ndarray | None = None,
) -> SelfDedup:
    """Self-dedup by the cosine alone (the paper's): the candidate graph's components, the best of each kept."""
    vectors = check_vectors(vectors, "embeddings")
    n = len(vectors)
    return keep_one_per_component(n, knn_edges(vectors, min(k, n) if n > 1 else 2, threshold, index), preference)


def relative_dedup(
    pool: np.ndarray, evaluation: list[np.ndarray], k: int, threshold: float, index: IndexParams | None = None
) -> np.ndarray:
    """Relative dedup by the cosine alone (the paper's): mask over the pool, True where the image's component
    of the graph over pool + evaluation sets holds no evaluation image."""
    pool = check_vectors(pool, "pool embeddings")
    if not evaluation:
        return np.ones(len(pool), dtype=bool)
    sets = [
        check_vectors(vectors, f"evaluation set {i} embeddings", pool.shape[1]) for i, vectors in enumerate(evaluation)
    ]
    everything = np.concatenate([pool, *sets])
    edges = knn_edges(everything, max(2, min(k, len(everything))), threshold, index)
    return untouched(len(pool), len(everything), edges)


def _speak_up(guards: str, message: str) -> None:
    if guards == "error":
        raise CurationGuardError(f"{message} (dedup.guards: warn goes on with a warning)")
    logger.warning(message)


def _threshold(explicit: float | None, embeddings: EmbeddingSet, kind: str, guards: str) -> float:
    """The threshold in use: from params, else the one recorded with the embeddings, if it is this model's."""
    if explicit is not None:
        if not embeddings.thresholds_calibrated:
            logger.warning(
                "dedup.%s_threshold = %s: no threshold is calibrated for %s (the embedder of %s); check the "
                "duplicate groups it finds (plots/duplicate_groups.png)",
                kind, explicit, embeddings.embedder, embeddings.folder,
            )  # fmt: skip
        return check_threshold(explicit, f"{kind} dedup threshold")
    value = embeddings.thresholds[kind]
    if not embeddings.thresholds_calibrated:
        _speak_up(
            guards,
            f"the {kind}-dedup threshold {value} was calibrated for {embeddings.thresholds_calibrated_for}, not for "
            f"{embeddings.embedder}, which embedded {embeddings.folder}: set dedup.{kind}_threshold to a cosine "
            "measured for this model (on planted copies of your images) or embed with a copy-detection model",
        )
    return check_threshold(value, f"{kind} dedup threshold")


def _eval_rows(evaluation: Sequence[EmbeddingSet], use_views: bool) -> tuple[list[np.ndarray], list[str]]:
    """Each evaluation set's vectors (with its views when used), and the image of every one of their rows."""
    vectors, paths = [], []
    for evaluation_set in evaluation:
        eval_paths = evaluation_set.manifest.column("path").to_pylist()
        vectors.append(evaluation_set.with_views() if use_views else evaluation_set.vectors)
        paths += eval_paths
        if use_views and evaluation_set.views is not None:
            paths += [path for path in eval_paths for _ in range(evaluation_set.views.shape[1])]
    return vectors, paths


def dedup(pool_dir: Path, eval_dirs: Sequence[Path], out: Path, params: DedupParams) -> dict:
    """The stage: ``kept.parquet``, ``duplicate_groups.parquet``, ``eval_leaks.parquet``, plots and metrics."""
    pool = load_embeddings(pool_dir)
    evaluation = [load_embeddings(folder, expected_dim=pool.dim) for folder in eval_dirs]
    for evaluation_set in evaluation:
        check_same_model(pool, evaluation_set)
    self_threshold = _threshold(params.self_threshold, pool, "self", params.guards)
    # Relative dedup runs only against evaluation sets; without them its threshold is not used.
    relative_threshold = _threshold(params.relative_threshold, pool, "relative", params.guards) if evaluation else None
    manifest = pool.manifest
    pixels = np.asarray(manifest.column("width").to_numpy(), dtype=np.int64) * manifest.column("height").to_numpy()
    size_bytes = manifest.column("size_bytes").to_numpy()
    paths = manifest.column("path").to_pylist()
    preference = preference_order(pixels, size_bytes, paths)
    verified: dict[str, int] = {}

    # Self-dedup: candidate graph -> verification -> components -> one image kept per component.
    vectors = check_vectors(pool.vectors, "embeddings")
    n = len(vectors)
    edges = knn_edges(vectors, min(params.k, n) if n > 1 else 2, self_threshold, params.index)
    if params.verify is not None and len(edges):
        edges, pairs = verify_pairs(edges, paths, params.verify, relative=False)
        verified.update(pairs)
    result = keep_one_per_component(n, edges, preference)
    counts = result.counts()
    largest, images = counts["largest_group"], counts["images"]
    if largest > params.group_guard_min_images and largest > params.max_group_share * images:
        _speak_up(
            params.guards,
            f"self-dedup put {largest:,} of {images:,} pool images ({largest / images:.1%}) in one duplicate "
            f"group, more than dedup.max_group_share = {params.max_group_share:g} of the pool: at the threshold "
            f"{self_threshold} the embeddings of {pool.embedder} do not tell these images apart; raise "
            "dedup.self_threshold or embed with a copy-detection model",
        )
    kept_rows = np.flatnonzero(result.keep)

    # Relative dedup: the kept pool + every evaluation row -> candidate graph -> verification -> components.
    clean = np.ones(len(kept_rows), dtype=bool)
    eval_vectors, eval_paths = _eval_rows(evaluation, params.use_eval_views)
    if relative_threshold is not None:
        everything = np.concatenate([check_vectors(pool.vectors[kept_rows], "pool embeddings"), *eval_vectors])
        edges = knn_edges(everything, max(2, min(params.k, len(everything))), relative_threshold, params.index)
        if params.verify is not None:
            edges = edges[(edges[:, 0] < len(kept_rows)) != (edges[:, 1] < len(kept_rows))]
            if len(edges):
                row_paths = [paths[row] for row in kept_rows] + eval_paths
                edges, pairs = verify_pairs(edges, row_paths, params.verify, relative=True)
                verified.update(pairs)
        clean = untouched(len(kept_rows), len(everything), edges)
    final_rows = kept_rows[clean]

    with output_folder(out, ("plots",)) as folder:
        ids = np.asarray(pool.ids, dtype=object)
        write_table(manifest.take(pa.array(final_rows)), folder / "kept.parquet")
        # Each group best copy first: the kept image leads its rows in the table and in the grid.
        groups = [members[np.argsort(preference[members], kind="stable")] for members in result.groups()]
        reasons = [kept_reason(members, preference, pixels, size_bytes, paths) for members in groups]
        group_table = pa.table(
            {
                "id": [ids[row] for members in groups for row in members],
                "representative": [ids[members[0]] for members in groups for _ in members],
                "kept": [bool(row == members[0]) for members in groups for row in members],
                "group_size": [len(members) for members in groups for _ in members],
                "pixels": pa.array([pixels[row] for members in groups for row in members], pa.int64()),
                "size_bytes": pa.array([size_bytes[row] for members in groups for row in members], pa.int64()),
                "kept_reason": [reason for members, reason in zip(groups, reasons, strict=True) for _ in members],
            }
        )
        write_table(group_table, folder / "duplicate_groups.parquet")
        write_table(pa.table({"id": [ids[row] for row in kept_rows[~clean]]}), folder / "eval_leaks.parquet")
        shown = [[paths[row] for row in members[:8]] for members in groups[: params.report_groups]]
        image_grid(shown).save(folder / "plots" / "duplicate_groups.png")
        metrics = {
            "dedup/pool_images": counts["images"],
            "dedup/kept_most_pixels": reasons.count("most_pixels"),
            "dedup/kept_lossless_file": reasons.count("lossless_file"),
            "dedup/kept_largest_file": reasons.count("largest_file"),
            "dedup/kept_first_path": reasons.count("first_path"),
            "dedup/self_removed": counts["removed"],
            "dedup/duplicate_groups": counts["duplicate_groups"],
            "dedup/largest_group": largest,
            "dedup/largest_group_share": largest / images,
            "dedup/after_self_dedup": counts["kept"],
            "dedup/eval_images": sum(len(e.ids) for e in evaluation),
            "dedup/eval_vectors": sum(len(vectors) for vectors in eval_vectors),
            "dedup/eval_leaks_removed": int((~clean).sum()),
            "dedup/kept": len(final_rows),
            "dedup/self_threshold": self_threshold,
            "dedup/relative_threshold": relative_threshold,
            **verified,
        }
        write_json(metrics, folder / "metrics.json")
    return metrics
