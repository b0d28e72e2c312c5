"""Retrieving the pool images that look like a curated seed set (paper appendix A.3, Table 15).

- sample-based: the k nearest pool images of every seed image (k = 4; 32 for ImageNet-1k);
- cluster-based: k-means of the pool; every cluster holding more than ``min_seed_images`` seed images
  gives ``images_per_cluster`` of its images; at most ``max_images`` per seed dataset;
- balanced: hierarchical k-means of the pool and balanced sampling of ``max_images`` images, for a
  seed-free, uniformly spread selection.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinov2.atomic import output_folder, write_json, write_table
from dinov2.configuration.curation import IndexParams, RetrieveParams
from dinov2.curation.embeddings import EmbeddingError, check_same_model, embedder_name, load_embeddings
from dinov2.curation.index import VectorIndex, check_vectors
from dinov2.curation.kmeans import Hierarchy, balanced_sample, hierarchical_kmeans, kmeans
from dinov2.curation.manifest import read_manifest
from dinov2.curation.report import cluster_share_plot, image_grid

logger = logging.getLogger(__name__)


def sample_based(pool: np.ndarray, seed_vectors: np.ndarray, k: int, index: VectorIndex | None = None) -> np.ndarray:
    """Sorted unique pool rows among the k nearest neighbours of any seed vector."""
    index = index or VectorIndex(pool)
    _, rows = index.search(check_vectors(seed_vectors, "seed embeddings", index.dim), k)
    return np.unique(rows[rows >= 0])


def assign_to_centroids(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    _, rows = VectorIndex(centroids, IndexParams(kind="flat")).search(vectors, 1)
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


def _report_collisions(
    source: str, seed_images: int, k: int, distinct: int, metrics: dict, degenerate_share: float
) -> None:
    """Sample-based retrieval asks for seeds x k pool images; few distinct ones means the seeds collapse."""
    requested = seed_images * k
    share = distinct / requested
    metrics[f"retrieve/{source}/requested"] = requested
    metrics[f"retrieve/{source}/distinct"] = distinct
    metrics[f"retrieve/{source}/distinct_share"] = round(share, 4)
    if share < degenerate_share:
        logger.warning(
            "seed set %s: %d seed images x k=%d asked for %d pool images and got %d distinct (%.1f%%): the seeds "
            "mostly retrieve the same images, so the embedder hardly tells them apart (degenerate retrieval)",
            source,
            seed_images,
            k,
            requested,
            distinct,
            100 * share,
        )


def retrieve(pool_dir: Path, kept_manifest: Path, seed_dirs: Sequence[Path], out: Path, params: RetrieveParams) -> dict:
    """Curated manifest = union of what every seed set retrieves (plus a balanced sample when configured)."""
    seeds = [load_embeddings(folder) for folder in seed_dirs]
    sources = [seed.manifest.column("source")[0].as_py() for seed in seeds]
    unknown = sorted(set(params.datasets) - set(sources))
    if unknown:
        given = ", ".join(sources) if sources else "no seed set"
        raise ValueError(
            f"retrieve.datasets names {', '.join(unknown)}, but no --seed folder holds that source (given: {given})"
        )
    embeddings = load_embeddings(pool_dir)
    for seed in seeds:
        check_same_model(embeddings, seed)
    # dedup's copy detector and retrieval's embedder are different models: the embeddings of the wrong one
    # would retrieve by copy-likeness instead of by content
    expected = embedder_name(params.embedder.model)
    if embeddings.embedder != expected:
        raise EmbeddingError(
            f"{pool_dir} holds embeddings of {embeddings.embedder}, but retrieve.embedder.model is {expected}: "
            "embed the pool and seed sets with `dinov2 embed --section retrieve.embedder`"
        )
    kept_ids = set(read_manifest(kept_manifest, check_files=False).column("id").to_pylist())
    pool_rows = np.array([i for i, image_id in enumerate(embeddings.ids) if image_id in kept_ids], dtype=np.int64)
    if len(pool_rows) == 0:
        raise ValueError(f"none of the images of {kept_manifest} are embedded in {pool_dir}")
    pool = embeddings.vectors[pool_rows]
    pool_manifest = embeddings.manifest.take(pa.array(pool_rows))
    modes = {source: params.for_dataset(source) for source in sources}
    index = VectorIndex(pool, params.index)
    needs_clusters = any(mode.mode == "cluster" for mode in modes.values())
    centroids, pool_clusters = (
        cluster_pool(pool, params.n_clusters, params.kmeans_iterations, params.seed) if needs_clusters else (None, None)
    )
    retrieved_by: list[list[str]] = [[] for _ in range(len(pool))]
    metrics: dict[str, float] = {"retrieve/pool_images": len(pool)}
    with output_folder(out, ("plots",)) as folder:
        paths = pool_manifest.column("path").to_pylist()
        for seed, source in zip(seeds, sources, strict=True):
            mode = modes[source]
            if mode.mode == "sample":
                rows = sample_based(pool, seed.vectors, mode.k, index)
                _report_collisions(
                    source, len(seed.ids), min(mode.k, len(pool)), len(rows), metrics, params.degenerate_share
                )
                if mode.max_images is not None and len(rows) > mode.max_images:
                    rng = np.random.default_rng(params.seed)
                    rows = np.sort(rng.choice(rows, size=mode.max_images, replace=False))
            else:
                seed_clusters = assign_to_centroids(seed.vectors, centroids)
                rows = cluster_based(
                    pool_clusters,
                    seed_clusters,
                    mode.images_per_cluster,
                    mode.min_seed_images,
                    mode.max_images,
                    params.seed,
                )
            for row in rows:
                retrieved_by[row].append(source)
            metrics[f"retrieve/{source}/seed_images"] = len(seed.ids)
            metrics[f"retrieve/{source}/retrieved"] = len(rows)
            _, neighbours = index.search(seed.vectors[: params.report_seeds], 7)
            seed_paths = seed.manifest.column("path").to_pylist()
            grid = [[seed_paths[i], *(paths[r] for r in neighbours[i] if r >= 0)] for i in range(len(neighbours))]
            image_grid(grid).save(folder / "plots" / f"retrieved_{source}.png")
        if params.balanced is not None:
            options = params.balanced
            hierarchy = hierarchical_kmeans(
                pool,
                [min(level, len(pool)) for level in options.clusters_per_level],
                options.resampling_steps,
                options.resample_size,
                params.kmeans_iterations,
                params.seed,
            )
            rows = balanced_sample(hierarchy, options.images, params.seed)
            for row in rows:
                retrieved_by[row].append("balanced")
            metrics["retrieve/balanced/retrieved"] = len(rows)
        chosen = np.array([i for i, names in enumerate(retrieved_by) if names], dtype=np.int64)
        curated = pool_manifest.take(pa.array(chosen)).append_column(
            "retrieved_by", pa.array([",".join(retrieved_by[i]) for i in chosen], pa.string())
        )
        write_table(curated, folder / "curated.parquet")
        metrics["retrieve/curated"] = len(chosen)
        if pool_clusters is not None:
            pool_counts = np.bincount(pool_clusters, minlength=len(centroids))
            curated_counts = np.bincount(pool_clusters[chosen], minlength=len(centroids))
            distribution = [
                {"cluster": c, "pool": int(p), "curated": int(k)}
                for c, (p, k) in enumerate(zip(pool_counts, curated_counts, strict=True))
            ]
            write_json({"clusters": distribution}, folder / "plots" / "cluster_distribution.json")
            cluster_share_plot(
                {"pool": pool_counts, "curated": curated_counts}, folder / "plots" / "cluster_distribution.png"
            )
            metrics["retrieve/clusters_used"] = int((curated_counts > 0).sum())
        write_json(metrics, folder / "metrics.json")
    return metrics
