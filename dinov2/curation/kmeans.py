"""k-means through faiss (on every GPU when faiss has GPU support), and the hierarchical k-means with
resampling and balanced sampling of Vo et al. 2024 (arXiv 2405.15613), written from the paper.

Hierarchical k-means: level 1 clusters the vectors, level l+1 clusters the centroids of level l
(e.g. 10M -> 500k -> 50k -> 10k). Within a level, resampling moves centroids away from dense regions:
repeatedly take the ``resample_size`` points nearest each centroid and re-run k-means on the union of
those points only, starting from the current centroids, so every cluster has the same say in where
the centroids go. Balanced sampling then walks the tree top-down and gives every cluster an equal
share of the budget (a cluster smaller than its share gives the rest back to its siblings).
"""

from dataclasses import dataclass

import faiss
import numpy as np

from dinov2.curation.index import check_vectors, faiss_gpus


def kmeans(
    vectors: np.ndarray, n_clusters: int, iterations: int = 20, seed: int = 0, init: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, assignment) of spherical k-means: centroids are unit vectors, assignment by cosine."""
    vectors = check_vectors(vectors, "vectors to cluster")
    if not 1 <= n_clusters <= len(vectors):
        raise ValueError(f"cannot make {n_clusters} clusters of {len(vectors)} vectors")
    clustering = faiss.Kmeans(
        vectors.shape[1],
        n_clusters,
        niter=iterations,
        seed=seed,
        spherical=True,
        gpu=faiss_gpus() > 0,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    clustering.train(vectors, init_centroids=init)
    _, assignment = clustering.index.search(vectors, 1)
    return clustering.centroids.copy(), assignment[:, 0].astype(np.int64)


def nearest_to_centroids(vectors: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """Rows of the ``count`` vectors nearest each centroid (the union, sorted)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    _, rows = index.search(centroids, min(count, len(vectors)))
    return np.unique(rows[rows >= 0])


def resampled_kmeans(
    vectors: np.ndarray, n_clusters: int, resampling_steps: int, resample_size: int, iterations: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    centroids, _ = kmeans(vectors, n_clusters, iterations, seed)
    for step in range(resampling_steps):
        subset = nearest_to_centroids(vectors, centroids, resample_size)
        if len(subset) < n_clusters:
            break
        centroids, _ = kmeans(vectors[subset], n_clusters, iterations, seed + step + 1, init=centroids)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(centroids)
    _, assignment = index.search(vectors, 1)
    return centroids, assignment[:, 0].astype(np.int64)


@dataclass
class Hierarchy:
    """``assignments[0][i]``: level-1 cluster of vector i; ``assignments[l][c]``: parent of cluster c of level l."""

    assignments: list[np.ndarray]
    centroids: list[np.ndarray]

    def leaf_clusters(self) -> np.ndarray:
        return self.assignments[0]

    def top_clusters(self) -> np.ndarray:
        """The top-level cluster of every vector."""
        clusters = self.assignments[0]
        for parents in self.assignments[1:]:
            clusters = parents[clusters]
        return clusters


def hierarchical_kmeans(
    vectors: np.ndarray,
    clusters_per_level: list[int],
    resampling_steps: int = 10,
    resample_size: int = 10,
    iterations: int = 20,
    seed: int = 0,
) -> Hierarchy:
    if not clusters_per_level or any(b >= a for a, b in zip(clusters_per_level, clusters_per_level[1:], strict=False)):
        raise ValueError(f"clusters per level must be a decreasing list, got {clusters_per_level}")
    points = check_vectors(vectors, "vectors to cluster")
    assignments, centroids = [], []
    for level, n_clusters in enumerate(clusters_per_level):
        level_centroids, assignment = resampled_kmeans(
            points, n_clusters, resampling_steps, resample_size, iterations, seed + 1000 * level
        )
        assignments.append(assignment)
        centroids.append(level_centroids)
        points = level_centroids
    return Hierarchy(assignments, centroids)


def split_evenly(budget: int, capacities: np.ndarray) -> np.ndarray:
    """Integer shares of ``budget``, as equal as the capacities allow (water-filling)."""
    capacities = np.asarray(capacities, dtype=np.int64)
    shares = np.zeros(len(capacities), dtype=np.int64)
    remaining = min(int(budget), int(capacities.sum()))
    while remaining > 0:
        open_ = np.flatnonzero(shares < capacities)
        share = max(1, remaining // len(open_))
        for cluster in open_:
            give = min(share, capacities[cluster] - shares[cluster], remaining)
            shares[cluster] += give
            remaining -= give
            if remaining == 0:
                break
    return shares


def balanced_sample(hierarchy: Hierarchy, budget: int, seed: int = 0) -> np.ndarray:
    """Rows of ``budget`` vectors (or all of them), spread evenly over clusters at every level, top-down."""
    rng = np.random.default_rng(seed)
    leaf = hierarchy.leaf_clusters()
    # members[l][c]: the children of cluster c of level l (level 0's children are vector rows).
    members = []
    for assignment in hierarchy.assignments:
        order = np.argsort(assignment, kind="stable")
        n_clusters = int(assignment.max()) + 1 if len(assignment) else 0
        bounds = np.searchsorted(assignment[order], np.arange(n_clusters + 1))
        members.append([order[bounds[c] : bounds[c + 1]] for c in range(n_clusters)])
    sizes = [np.bincount(leaf, minlength=len(members[0]))]
    for level in range(1, len(members)):
        sizes.append(np.array([sizes[-1][children].sum() for children in members[level]], dtype=np.int64))

    chosen: list[np.ndarray] = []

    def descend(level: int, clusters: np.ndarray, quota: int) -> None:
        shares = split_evenly(quota, sizes[level][clusters])
        for cluster, share in zip(clusters, shares, strict=True):
            if share == 0:
                continue
            children = members[level][cluster]
            if level == 0:
                chosen.append(rng.choice(children, size=share, replace=False))
            else:
                descend(level - 1, children, int(share))

    top = len(members) - 1
    descend(top, np.arange(len(members[top])), budget)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
