"""Retrieving the pool images that look like a curated seed set (paper appendix A.3, Table 15).

- sample-based: the k nearest pool images of every seed image (k = 4; 32 for ImageNet-1k);
- cluster-based: k-means of the pool; every cluster holding more than ``min_seed_images`` seed images
  gives ``images_per_cluster`` of its images; at most ``max_images`` per seed dataset;
- balanced: hierarchical k-means of the pool and balanced sampling of ``max_images`` images, for a
  seed-free, uniformly spread selection.
"""

import numpy as np

from dinov2.curation.index import VectorIndex, check_vectors
from dinov2.curation.kmeans import Hierarchy, balanced_sample, hierarchical_kmeans, kmeans


def sample_based(pool: np.ndarray, seed_vectors: np.ndarray, k: int, index: VectorIndex | None = None) -> np.ndarray:
    """Sorted unique pool rows among the k nearest neighbours of any seed vector."""
    index = index or VectorIndex(pool)
    _, rows = index.search(check_vectors(seed_vectors, "seed embeddings", index.dim), k)
    return np.unique(rows[rows >= 0])


def assign_to_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    _, rows = VectorIndex(centroids, kind="flat").search(vectors, 1)
    return rows[:, 0]


def cluster_based(
    pool_clusters: np.ndarray,
    seed_clusters: np.ndarray,
    images_per_cluster: int,
    min_seed_images: int,
    max_images: int | None,
    seed: int = 0,
) -> np.ndarray:
    """Sorted pool rows: up to ``images_per_cluster`` from each cluster with more than ``min_seed_images`` seeds."""
    rng = np.random.default_rng(seed)
    n_clusters = int(max(pool_clusters.max(initial=-1), seed_clusters.max(initial=-1))) + 1
    seeds_per_cluster = np.bincount(seed_clusters, minlength=n_clusters)
    chosen = []
    for cluster in np.flatnonzero(seeds_per_cluster > min_seed_images):
        members = np.flatnonzero(pool_clusters == cluster)
        if len(members) > images_per_cluster:
            members = rng.choice(members, size=images_per_cluster, replace=False)
        chosen.append(members)
    rows = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    if max_images is not None and len(rows) > max_images:
        rows = rng.choice(rows, size=max_images, replace=False)
    return np.sort(rows)


def cluster_pool(
    pool: np.ndarray, n_clusters: int, iterations: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    return kmeans(pool, min(n_clusters, len(pool)), iterations, seed)


def balanced(
    pool: np.ndarray, clusters_per_level: list[int], budget: int, seed: int = 0, **options
) -> tuple[np.ndarray, Hierarchy]:
    hierarchy = hierarchical_kmeans(pool, clusters_per_level, seed=seed, **options)
    return balanced_sample(hierarchy, budget, seed), hierarchy
