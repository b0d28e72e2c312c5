"""The four curation stages as library calls: read inputs, run the algorithm, write one output folder.

Every stage but ``embed`` writes into ``<out>.partial`` and renames it to ``<out>`` when it is complete,
so an interrupted or failed run never leaves a folder that looks finished (``embed`` is resumable
instead: see ``embeddings.py``). Each output folder holds ``metrics.json`` (DVC metrics) and
``plots/`` (DVC plots).

The stages speak up when a result is almost certainly wrong rather than write it without a word:
``dedup`` refuses thresholds calibrated for another model and a duplicate group that swallows the pool
(``dedup.guards: warn`` turns these errors into warnings); ``dedup`` and ``retrieve`` refuse to compare
embeddings of different models; ``retrieve`` refuses per-dataset settings for a seed set it was not
given and warns when the seeds of a set mostly retrieve the same pool images.
"""

import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from dinov2.curation.dedup import EdgeCheck, check_threshold, relative_dedup, self_dedup
from dinov2.curation.embedders import build_embedder, embedder_name
from dinov2.curation.embeddings import EmbeddingError, EmbeddingSet, check_same_model, embed_manifest, load_embeddings
from dinov2.curation.index import VectorIndex
from dinov2.curation.kmeans import balanced_sample, hierarchical_kmeans
from dinov2.curation.manifest import build_manifest, read_manifest, write_table_atomically
from dinov2.curation.params import DedupParams, EmbedParams, PrepareParams, RetrieveParams, VerifyParams
from dinov2.curation.report import cluster_share_plot, image_grid, write_json
from dinov2.curation.representatives import kept_reason, preference_order
from dinov2.curation.retrieval import assign_to_centroids, cluster_based, cluster_pool, sample_based
from dinov2.curation.verify import distinct_matches, grey_thumbnails, verified_edges

logger = logging.getLogger(__name__)

# A handful of copies of one image is common in any pool; the group-share guard is for groups that swallow
# a pool, so groups up to this size never trip it (a 2-image group is 10% of a 20-image pool).
GROUP_GUARD_MIN_IMAGES = 10
# Sample-based retrieval below this share of distinct images (distinct / seeds x k) is reported degenerate.
DEGENERATE_DISTINCT_SHARE = 0.5


class CurationGuardError(ValueError):
    """A result that is almost certainly wrong: a threshold of another model, a group that swallows the pool."""


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
    if params.calibrated_thresholds is not None:
        embedder.thresholds = dict(params.calibrated_thresholds)
        embedder.thresholds_calibrated_for = embedder.name
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
                kind,
                explicit,
                embeddings.embedder,
                embeddings.folder,
            )
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


def _pixel_check(
    verify: VerifyParams | None, paths: Sequence[str], kind: str, counts: dict[str, int]
) -> EdgeCheck | None:
    """The edge check of ``dedup.verify`` over graph rows whose images are ``paths`` (``kind``: self or relative,
    which picks the threshold and, for relative, adds the distinct-match rule); it counts, in ``counts``, the
    image pairs it scored and those it kept."""
    if verify is None:
        return None
    threshold = verify.threshold
    if kind == "relative" and verify.relative_threshold is not None:
        threshold = verify.relative_threshold
    distinct_threshold = verify.distinct_threshold if kind == "relative" else None

    def check(edges: np.ndarray) -> np.ndarray:
        # Each image read and each pair of images scored once: an image is in many pairs, and an evaluation
        # image is also the row of each of its views.
        distinct = sorted({paths[row] for row in np.unique(edges)})
        images = grey_thumbnails(distinct, verify.side)
        position = {path: n for n, path in enumerate(distinct)}
        rows = np.unique(edges)
        image_of = np.zeros(rows.max() + 1 if len(rows) else 0, dtype=np.int64)
        image_of[rows] = [position[paths[row]] for row in rows]
        image_edges = image_of[edges]
        pairs, inverse = np.unique(np.sort(image_edges, axis=1), axis=0, return_inverse=True)
        _, scores = verified_edges(pairs, lambda chosen: images[chosen].float() / 255, threshold, verify.steps)
        holds = scores >= threshold
        if distinct_threshold is not None:
            holds |= (scores >= distinct_threshold) & distinct_matches(pairs, scores, verify.distinct_margin)
        counts[f"dedup/{kind}_candidate_pairs"] = len(pairs)
        counts[f"dedup/{kind}_verified_pairs"] = int(holds.sum())
        logger.info(
            "%s dedup: %d of %d candidate image pairs verified (aligned pixel correlation >= %s%s)",
            kind, counts[f"dedup/{kind}_verified_pairs"], counts[f"dedup/{kind}_candidate_pairs"], threshold,
            "" if distinct_threshold is None
            else f", or >= {distinct_threshold} for a distinct match leading by {verify.distinct_margin}",
        )  # fmt: skip
        return edges[holds[inverse.reshape(-1)]]

    return check


def dedup(pool_dir: Path, eval_dirs: Sequence[Path], out: Path, params: DedupParams) -> dict:
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
    with output_folder(out) as folder:
        checks: dict[str, int] = {}
        result = self_dedup(
            pool.vectors, params.k, self_threshold, params.index, params.placement, params.nprobe, preference,
            verify=_pixel_check(params.verify, paths, "self", checks),
        )  # fmt: skip
        counts = result.counts()
        largest, images = counts["largest_group"], counts["images"]
        if largest > GROUP_GUARD_MIN_IMAGES and largest > params.max_group_share * images:
            _speak_up(
                params.guards,
                f"self-dedup put {largest:,} of {images:,} pool images ({largest / images:.1%}) in one duplicate "
                f"group, more than dedup.max_group_share = {params.max_group_share:g} of the pool: at the threshold "
                f"{self_threshold} the embeddings of {pool.embedder} do not tell these images apart; raise "
                "dedup.self_threshold or embed with a copy-detection model",
            )
        kept_rows = np.flatnonzero(result.keep)
        clean = np.ones(len(kept_rows), dtype=bool)
        if relative_threshold is not None:
            rows_paths: list[str] = []  # the image of every row of relative dedup's graph, for the pixel check
            if params.verify is not None:
                rows_paths = [paths[row] for row in kept_rows]
                for evaluation_set in evaluation:
                    eval_paths = evaluation_set.manifest.column("path").to_pylist()
                    rows_paths += eval_paths
                    if params.use_eval_views and evaluation_set.views is not None:
                        rows_paths += [path for path in eval_paths for _ in range(evaluation_set.views.shape[1])]
            clean = relative_dedup(
                pool.vectors[kept_rows],
                [e.with_views() if params.use_eval_views else e.vectors for e in evaluation],
                params.k,
                relative_threshold,
                params.index,
                params.placement,
                params.nprobe,
                verify=_pixel_check(params.verify, rows_paths, "relative", checks),
            )
        final_rows = kept_rows[clean]
        ids = np.asarray(pool.ids, dtype=object)
        write_table_atomically(manifest.take(pa.array(final_rows)), folder / "kept.parquet")
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
        write_table_atomically(group_table, folder / "duplicate_groups.parquet")
        removed = pa.table({"id": [ids[row] for row in kept_rows[~clean]]})
        write_table_atomically(removed, folder / "eval_leaks.parquet")
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
            "dedup/eval_vectors": sum(len(e.with_views() if params.use_eval_views else e.vectors) for e in evaluation),
            "dedup/eval_leaks_removed": int((~clean).sum()),
            "dedup/kept": len(final_rows),
            "dedup/self_threshold": self_threshold,
            "dedup/relative_threshold": relative_threshold,
            **checks,
        }
        write_json(metrics, folder / "metrics.json")
    return metrics


def _report_collisions(source: str, seed_images: int, k: int, distinct: int, metrics: dict) -> None:
    """Sample-based retrieval asks for seeds x k pool images; few distinct ones means the seeds collapse."""
    requested = seed_images * k
    share = distinct / requested
    metrics[f"retrieve/{source}/requested"] = requested
    metrics[f"retrieve/{source}/distinct"] = distinct
    metrics[f"retrieve/{source}/distinct_share"] = round(share, 4)
    if share < DEGENERATE_DISTINCT_SHARE:
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
                _report_collisions(source, len(seed.ids), min(mode.k, len(pool)), len(rows), metrics)
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
