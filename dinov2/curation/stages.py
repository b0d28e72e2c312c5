"""The four curation stages as library calls: read inputs, run the algorithm, write one output folder.

Every stage but ``embed`` writes into ``<out>.partial`` and renames it to ``<out>`` when it is complete,
so an interrupted or failed run never leaves a folder that looks finished (``embed`` is resumable
instead: see ``embeddings.py``). Each output folder holds ``metrics.json`` (DVC metrics) and
``plots/`` (DVC plots).
"""

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinov2.curation.dedup import check_threshold, relative_dedup, self_dedup
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import EmbeddingSet, embed_manifest, load_embeddings
from dinov2.curation.index import VectorIndex
from dinov2.curation.kmeans import balanced_sample, hierarchical_kmeans
from dinov2.curation.manifest import build_manifest, read_manifest, write_table_atomically
from dinov2.curation.params import DedupParams, EmbedParams, PrepareParams, RetrieveParams
from dinov2.curation.report import cluster_share_plot, image_grid, write_json
from dinov2.curation.representatives import kept_reason, preference_order
from dinov2.curation.retrieval import assign_to_centroids, cluster_based, cluster_pool, sample_based


@contextmanager
def output_folder(out: Path) -> Iterator[Path]:
    """A fresh ``<out>.partial`` folder that replaces ``out`` only if the block completes."""
    out = Path(out)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "plots").mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def prepare(images: Path, source: str, split: str, out: Path, params: PrepareParams) -> dict:
    built = build_manifest(
        images, source, split, labels_from_folders=params.labels_from_folders, max_pixels=params.max_pixels
    )
    with output_folder(out) as folder:
        write_table_atomically(built.table, folder / "manifest.parquet")
        write_table_atomically(built.unreadable, folder / "unreadable.parquet")
        metrics = {f"prepare/{key}": value for key, value in built.counts().items()}
        write_json(metrics, folder / "metrics.json")
    return metrics


def embed(manifest: Path, out: Path, params: EmbedParams) -> dict:
    splits = set(read_manifest(manifest).column("split").to_pylist())
    views = params.eval_views if splits == {"eval"} else []
    embedder = build_embedder(params.model, params.weights, params.crop_size, params.device)
    summary = embed_manifest(
        manifest,
        out,
        embedder,
        params.batch_size,
        params.shard_size,
        views,
        num_workers=params.num_workers,
        max_pixels=params.max_pixels,
    )
    metrics = {f"embed/{key}": value for key, value in summary.items()}
    if "embed/embedded" in metrics:
        write_json(metrics, Path(out) / "metrics.json")
    return metrics


def _threshold(explicit: float | None, embeddings: EmbeddingSet, kind: str) -> float:
    value = explicit if explicit is not None else embeddings.thresholds[kind]
    return check_threshold(value, f"{kind} dedup threshold")


def dedup(pool_dir: Path, eval_dirs: Sequence[Path], out: Path, params: DedupParams) -> dict:
    pool = load_embeddings(pool_dir)
    evaluation = [load_embeddings(folder, expected_dim=pool.dim) for folder in eval_dirs]
    self_threshold = _threshold(params.self_threshold, pool, "self")
    relative_threshold = _threshold(params.relative_threshold, pool, "relative")
    manifest = pool.manifest
    pixels = np.asarray(manifest.column("width").to_numpy(), dtype=np.int64) * manifest.column("height").to_numpy()
    size_bytes = manifest.column("size_bytes").to_numpy()
    paths = manifest.column("path").to_pylist()
    preference = preference_order(pixels, size_bytes, paths)
    with output_folder(out) as folder:
        result = self_dedup(
            pool.vectors, params.k, self_threshold, params.index, params.placement, params.nprobe, preference
        )
        kept_rows = np.flatnonzero(result.keep)
        clean = relative_dedup(
            pool.vectors[kept_rows],
            [e.with_views() if params.use_eval_views else e.vectors for e in evaluation],
            params.k,
            relative_threshold,
            params.index,
            params.placement,
            params.nprobe,
        )
        final_rows = kept_rows[clean]
        ids = np.asarray(pool.ids, dtype=object)
        write_table_atomically(manifest.take(pa.array(final_rows)), folder / "kept.parquet")
        # Each group best copy first: the kept image leads its rows in the table and in the grid.
        groups = [members[np.argsort(preference[members], kind="stable")] for members in result.groups()]
        reasons = [kept_reason(members, preference, pixels, size_bytes) for members in groups]
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
        write_table_atomically(group_table, folder / "duplicate_groups.parquet")
        removed = pa.table({"id": [ids[row] for row in kept_rows[~clean]]})
        write_table_atomically(removed, folder / "eval_leaks.parquet")
        shown = [[paths[row] for row in members[:8]] for members in groups[: params.report_groups]]
        image_grid(shown).save(folder / "plots" / "duplicate_groups.png")
        counts = result.counts()
        metrics = {
            "dedup/pool_images": counts["images"],
            "dedup/kept_most_pixels": reasons.count("most_pixels"),
            "dedup/kept_largest_file": reasons.count("largest_file"),
            "dedup/kept_first_path": reasons.count("first_path"),
            "dedup/self_removed": counts["removed"],
            "dedup/duplicate_groups": counts["duplicate_groups"],
            "dedup/largest_group": counts["largest_group"],
            "dedup/after_self_dedup": counts["kept"],
            "dedup/eval_images": sum(len(e.ids) for e in evaluation),
            "dedup/eval_vectors": sum(len(e.with_views() if params.use_eval_views else e.vectors) for e in evaluation),
            "dedup/eval_leaks_removed": int((~clean).sum()),
            "dedup/kept": len(final_rows),
            "dedup/self_threshold": self_threshold,
            "dedup/relative_threshold": relative_threshold,
        }
        write_json(metrics, folder / "metrics.json")
    return metrics


def retrieve(pool_dir: Path, kept_manifest: Path, seed_dirs: Sequence[Path], out: Path, params: RetrieveParams) -> dict:
    """Curated manifest = union of what every seed set retrieves (plus a balanced sample when configured)."""
    embeddings = load_embeddings(pool_dir)
    kept_ids = set(read_manifest(kept_manifest, check_files=False).column("id").to_pylist())
    pool_rows = np.array([i for i, image_id in enumerate(embeddings.ids) if image_id in kept_ids], dtype=np.int64)
    if len(pool_rows) == 0:
        raise ValueError(f"none of the images of {kept_manifest} are embedded in {pool_dir}")
    pool = embeddings.vectors[pool_rows]
    pool_manifest = embeddings.manifest.take(pa.array(pool_rows))
    seeds = [load_embeddings(folder, expected_dim=embeddings.dim) for folder in seed_dirs]
    sources = [seed.manifest.column("source")[0].as_py() for seed in seeds]
    modes = {source: params.for_dataset(source) for source in sources}
    index = VectorIndex(pool)
    needs_clusters = any(mode.mode == "cluster" for mode in modes.values())
    centroids, pool_clusters = (
        cluster_pool(pool, params.n_clusters, params.kmeans_iterations, params.seed) if needs_clusters else (None, None)
    )
    retrieved_by: list[list[str]] = [[] for _ in range(len(pool))]
    metrics: dict[str, float] = {"retrieve/pool_images": len(pool)}
    with output_folder(out) as folder:
        paths = pool_manifest.column("path").to_pylist()
        for seed, source in zip(seeds, sources, strict=True):
            mode = modes[source]
            if mode.mode == "sample":
                rows = sample_based(pool, seed.vectors, mode.k, index)
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
        write_table_atomically(curated, folder / "curated.parquet")
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
