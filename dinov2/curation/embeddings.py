"""Embedding a manifest into fp16 ``.npy`` shards, and reading them back.

Layout of an embedding folder::

    manifest.parquet            the manifest that was embedded (rows in the same order)
    shards/rows-00003.npy       manifest row numbers embedded in shard 3 (unreadable images left out)
    shards/vectors-00003.npy    their L2-normalised fp16 embeddings, written through a memory map
    shards/views-00003.npy      only with views (evaluation sets): (rows, views, dim) fp16 embeddings
                                of each image's extra views (``views.py``)
    views.json                  the view names the shards were embedded with
    embeddings.json             embedder, dimension, thresholds, views, shard list, counts: written LAST

Shard ``i`` always covers manifest rows ``[i * shard_size, (i + 1) * shard_size)``, so a rerun skips
every shard already on disk (resume) and, under torchrun, rank ``r`` of ``w`` takes the shards
``i % w == r``. A shard's vectors are written under a temporary name and renamed when complete; a
folder without ``embeddings.json`` is incomplete and is refused by ``load_embeddings``.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch.distributed as dist
from tqdm import tqdm

from dinov2.curation.embedders import Embedder
from dinov2.curation.manifest import ManifestError, read_manifest, write_table_atomically
from dinov2.curation.views import View, expand, parse_views, views_per_image
from dinov2.data.images import SkippedImages, try_read_rgb

logger = logging.getLogger(__name__)

META_FILE = "embeddings.json"


class EmbeddingError(ValueError):
    """An embedding folder that is incomplete, inconsistent or of the wrong dimension."""


@dataclass
class EmbeddingSet:
    """Embeddings of the readable rows of a manifest: ``vectors[i]`` belongs to ``manifest`` row i."""

    manifest: pa.Table
    vectors: np.ndarray
    embedder: str
    thresholds: dict[str, float]
    views: np.ndarray | None = None  # (n, views, dim): extra views of row i in views[i]
    view_names: tuple[str, ...] = ()

    def with_views(self) -> np.ndarray:
        """Every vector of the set: the images' own, then all their extra views."""
        if self.views is None:
            return self.vectors
        return np.concatenate([self.vectors, self.views.reshape(-1, self.dim)])

    @property
    def ids(self) -> list[str]:
        return self.manifest.column("id").to_pylist()

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    return folder / "shards" / f"rows-{shard:05d}.npy", folder / "shards" / f"vectors-{shard:05d}.npy"


def views_path(folder: Path, shard: int) -> Path:
    return folder / "shards" / f"views-{shard:05d}.npy"


def _shard_done(folder: Path, shard: int, with_views: bool) -> bool:
    paths = [*shard_paths(folder, shard), *([views_path(folder, shard)] if with_views else [])]
    return all(path.is_file() for path in paths)


def _distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's environment, with a process group started when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if os.environ.get("LOCAL_RANK") and _has_cuda() else "gloo")
    return int(os.environ.get("RANK", "0")), world


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _drop_shards_of_another_manifest(out: Path, manifest: pa.Table, views: list[str]) -> None:
    """Resuming is only sound over the same rows and views: shards of another manifest or views are deleted."""
    previous = out / "manifest.parquet"
    if previous.is_file() and not read_manifest(previous, check_files=False).equals(manifest):
        logger.info("%s held embeddings of another manifest: starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)
    recorded = out / "views.json"
    if (out / "shards").is_dir() and (json.loads(recorded.read_text()) if recorded.is_file() else []) != views:
        logger.info("%s held embeddings of other views: starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)


def _write_shard(
    embedder: Embedder,
    paths: list[str],
    first_row: int,
    folder: Path,
    shard: int,
    batch_size: int,
    views: list[View],
) -> tuple[int, int]:
    """Embed one shard (and the extra views of its images); returns (embedded, unreadable)."""
    rows_path, vectors_path = shard_paths(folder, shard)
    view_count = views_per_image(views)
    skipped = SkippedImages()
    images, rows = [], []
    for offset, path in enumerate(paths):
        image = try_read_rgb(path, skipped)
        if image is not None:
            images.append(image)
            rows.append(first_row + offset)
    partial_vectors = vectors_path.with_name(f".{vectors_path.name}.partial")
    partial_rows = rows_path.with_name(f".{rows_path.name}.partial.npy")
    partial_views = views_path(folder, shard).with_name(f".views-{shard:05d}.npy.partial")
    try:
        vectors = np.lib.format.open_memmap(
            partial_vectors, mode="w+", dtype=np.float16, shape=(len(rows), embedder.dim)
        )
        view_vectors = (
            np.lib.format.open_memmap(
                partial_views, mode="w+", dtype=np.float16, shape=(len(rows), view_count, embedder.dim)
            )
            if views
            else None
        )
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = embedder.embed(chunk)
            if batch.shape[1] != embedder.dim:
                raise EmbeddingError(f"{embedder.name} returned {batch.shape[1]} values, announced {embedder.dim}")
            vectors[start : start + len(batch)] = batch.astype(np.float16)
            if view_vectors is not None:
                extra = embedder.embed([crop for image in chunk for crop in expand(image, views)])
                view_vectors[start : start + len(chunk)] = extra.reshape(len(chunk), view_count, -1)
        vectors.flush()
        del vectors
        if view_vectors is not None:
            view_vectors.flush()
            del view_vectors
            os.replace(partial_views, views_path(folder, shard))
        np.save(partial_rows, np.asarray(rows, dtype=np.int64))
        os.replace(partial_rows, rows_path)
        os.replace(partial_vectors, vectors_path)
    finally:
        partial_vectors.unlink(missing_ok=True)
        partial_rows.unlink(missing_ok=True)
        partial_views.unlink(missing_ok=True)
    return len(rows), len(skipped)


def embed_manifest(
    manifest_path: str | Path,
    out: str | Path,
    embedder: Embedder,
    batch_size: int = 64,
    shard_size: int = 10_000,
    views: list[str] | None = None,
) -> dict:
    """Embed every image of a manifest into ``out`` (resumable, sharded over torchrun ranks).

    ``views`` (names as in ``views.py``) also embeds those extra views of every image.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive")
    view_names = list(views or [])
    parsed_views = parse_views(view_names)
    manifest = read_manifest(manifest_path)
    out = Path(out)
    rank, world = _distributed()
    meta_path = out / META_FILE
    if rank == 0:
        meta_path.unlink(missing_ok=True)
        _drop_shards_of_another_manifest(out, manifest, view_names)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write_table_atomically(manifest, out / "manifest.parquet")
        partial_views = out / ".views.json.partial"
        partial_views.write_text(json.dumps(view_names) + "\n")
        os.replace(partial_views, out / "views.json")
    if world > 1:
        dist.barrier()
    paths = manifest.column("path").to_pylist()
    n_shards = (len(paths) + shard_size - 1) // shard_size
    mine = [shard for shard in range(n_shards) if shard % world == rank]
    todo = [shard for shard in mine if not _shard_done(out, shard, bool(parsed_views))]
    start = time.perf_counter()
    embedded = unreadable = 0
    with tqdm(total=sum(min(shard_size, len(paths) - s * shard_size) for s in todo), desc="embed", unit="img") as bar:
        for shard in todo:
            first = shard * shard_size
            done, bad = _write_shard(
                embedder, paths[first : first + shard_size], first, out, shard, batch_size, parsed_views
            )
            embedded, unreadable = embedded + done, unreadable + bad
            bar.update(done + bad)
    seconds = time.perf_counter() - start
    if world > 1:
        dist.barrier()
    summary = {
        "images": len(paths),
        "shards": n_shards,
        "shards_resumed": len(mine) - len(todo),
        "embedded_now": embedded,
        "images_per_second": round(embedded / seconds, 2) if embedded else 0.0,
    }
    if rank == 0:
        counted = sum(len(np.load(shard_paths(out, shard)[0], mmap_mode="r")) for shard in range(n_shards))
        summary["embedded"] = counted
        summary["unreadable"] = len(paths) - counted
        meta = {
            "embedder": embedder.name,
            "dim": embedder.dim,
            "dtype": "float16",
            "shard_size": shard_size,
            "shards": n_shards,
            "thresholds": embedder.thresholds,
            "views": view_names,
            **{key: summary[key] for key in ("images", "embedded", "unreadable")},
        }
        partial = meta_path.with_name(f".{META_FILE}.partial")
        partial.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(partial, meta_path)
    logger.info("embedded %d images at %.1f img/s", embedded, summary["images_per_second"])
    return summary


def load_embeddings(folder: str | Path, expected_dim: int | None = None) -> EmbeddingSet:
    """All shards of a complete embedding folder as one float32 matrix, rows aligned with the manifest."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise EmbeddingError(f"{folder} is not a complete embedding folder (no {META_FILE}); run `dinov2 embed`")
    meta = json.loads(meta_path.read_text())
    try:
        manifest = read_manifest(folder / "manifest.parquet", check_files=False)
    except ManifestError as error:
        raise EmbeddingError(str(error)) from error
    view_names = tuple(meta.get("views", []))
    view_count = views_per_image(parse_views(list(view_names)))
    rows, vectors, views = [], [], []
    for shard in range(meta["shards"]):
        rows_path, vectors_path = shard_paths(folder, shard)
        if not (rows_path.is_file() and vectors_path.is_file()):
            raise EmbeddingError(f"{folder}: shard {shard} is missing; rerun `dinov2 embed` to complete it")
        shard_vectors = np.load(vectors_path, mmap_mode="r")
        if shard_vectors.ndim != 2 or shard_vectors.shape[1] != meta["dim"]:
            raise EmbeddingError(f"{vectors_path} has shape {shard_vectors.shape}, expected (n, {meta['dim']})")
        rows.append(np.load(rows_path))
        vectors.append(np.asarray(shard_vectors, dtype=np.float32))
        if view_names:
            if not views_path(folder, shard).is_file():
                raise EmbeddingError(f"{folder}: the views of shard {shard} are missing; rerun `dinov2 embed`")
            shard_views = np.load(views_path(folder, shard), mmap_mode="r")
            if shard_views.shape != (len(shard_vectors), view_count, meta["dim"]):
                raise EmbeddingError(
                    f"{views_path(folder, shard)} has shape {shard_views.shape}, "
                    f"expected ({len(shard_vectors)}, {view_count}, {meta['dim']})"
                )
            views.append(np.asarray(shard_views, dtype=np.float32))
    if expected_dim is not None and meta["dim"] != expected_dim:
        raise EmbeddingError(
            f"{folder} holds {meta['dim']}-d embeddings ({meta['embedder']}), expected {expected_dim}-d: "
            "embed every set with the same embedder"
        )
    all_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, meta["dim"]), dtype=np.float32)
    all_views = (
        (np.concatenate(views) if views else np.zeros((0, view_count, meta["dim"]), dtype=np.float32))
        if view_names
        else None
    )
    return EmbeddingSet(
        manifest.take(pa.array(all_rows)), matrix, meta["embedder"], meta["thresholds"], all_views, view_names
    )
