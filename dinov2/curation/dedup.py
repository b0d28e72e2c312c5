"""Self-dedup and relative dedup on a k-NN graph (paper appendix A.2-A.3).

Self-dedup links every image to those of its k nearest neighbours (k = 64) whose cosine exceeds the
threshold, takes the connected components and keeps one image per component: the first in a given
preference order (the stage ranks the best copy first, ``representatives.py``; by default manifest
order), so the result does not depend on the search backend's tie order. Relative dedup builds the same
graph over pool + evaluation images and drops every pool image whose component holds an evaluation
image, so a chain of near-copies cannot smuggle a test image into pretraining.

Both take an optional ``verify``: given the graph's edges (E, 2), it returns those that hold (``verify.py``
aligns the two images' pixels). The threshold then only picks the candidates it checks; relative dedup then
links pool images to evaluation images only (the pool's own pairs are self-dedup's).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dinov2.curation.components import connected_components
from dinov2.curation.index import IndexKind, Placement, VectorIndex, check_vectors


def check_threshold(threshold: float, name: str) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must be a cosine similarity in [0, 1], got {threshold}")
    return float(threshold)


def knn_edges(
    vectors: np.ndarray,
    k: int,
    threshold: float,
    kind: IndexKind = "auto",
    placement: Placement = "auto",
    nprobe: int | None = None,
) -> np.ndarray:
    """(E, 2) edges i -> j for j among the k nearest neighbours of i with cosine > threshold."""
    check_threshold(threshold, "threshold")
    if k < 2:
        raise ValueError(f"k must be at least 2 (the nearest neighbour of a vector is itself), got {k}")
    index = VectorIndex(vectors, kind=kind, placement=placement, nprobe=nprobe)
    sims, rows = index.search(index.vectors, k)
    linked = (sims > threshold) & (rows >= 0)
    sources = np.broadcast_to(np.arange(len(vectors))[:, None], rows.shape)
    return np.stack([sources[linked], rows[linked]], axis=1)


EdgeCheck = Callable[[np.ndarray], np.ndarray]


def _checked(edges: np.ndarray, verify: EdgeCheck | None) -> np.ndarray:
    """The edges between different images that ``verify`` (when given) keeps."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    return edges if verify is None or not len(edges) else verify(edges)


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


def self_dedup(
    vectors: np.ndarray,
    k: int = 64,
    threshold: float = 0.6,
    kind: IndexKind = "auto",
    placement: Placement = "auto",
    nprobe: int | None = None,
    preference: np.ndarray | None = None,
    verify: EdgeCheck | None = None,
) -> SelfDedup:
    """Components of the k-NN graph; ``preference[i]`` ranks image i (0 = best), the best of each is kept."""
    vectors = check_vectors(vectors, "embeddings")
    n = len(vectors)
    preference = np.arange(n) if preference is None else np.asarray(preference, dtype=np.int64)
    if preference.shape != (n,) or len(np.unique(preference)) != n:
        raise ValueError(f"preference must rank the {n} images with {n} distinct numbers, got shape {preference.shape}")
    k = min(k, n) if n > 1 else 2
    labels = connected_components(n, _checked(knn_edges(vectors, k, threshold, kind, placement, nprobe), verify))
    best = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(best, labels, preference)
    return SelfDedup(labels, preference == best[labels])


def relative_dedup(
    pool: np.ndarray,
    evaluation: list[np.ndarray],
    k: int = 64,
    threshold: float = 0.45,
    kind: IndexKind = "auto",
    placement: Placement = "auto",
    nprobe: int | None = None,
    verify: EdgeCheck | None = None,
) -> np.ndarray:
    """Boolean mask over the pool: True where the image's component holds no evaluation image. Rows of the
    graph (and of the edges ``verify`` gets): the pool's, then each evaluation set's, in order."""
    pool = check_vectors(pool, "pool embeddings")
    if not evaluation:
        return np.ones(len(pool), dtype=bool)
    sets = [
        check_vectors(vectors, f"evaluation set {i} embeddings", pool.shape[1]) for i, vectors in enumerate(evaluation)
    ]
    everything = np.concatenate([pool, *sets])
    edges = knn_edges(everything, max(2, min(k, len(everything))), threshold, kind, placement, nprobe)
    if verify is not None:
        # Only pool-evaluation pairs are checked: the pool's own pairs were checked by self-dedup, and a link
        # between two evaluation images changes which pool images are removed no more than none.
        edges = edges[(edges[:, 0] < len(pool)) != (edges[:, 1] < len(pool))]
    labels = connected_components(len(everything), _checked(edges, verify))
    tainted = np.zeros(len(everything), dtype=bool)
    tainted[np.unique(labels[len(pool) :])] = True
    return ~tainted[labels[: len(pool)]]
