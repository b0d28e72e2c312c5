"""Embedding a manifest into fp16 ``.npy`` shards, and reading them back.

Layout of an embedding folder::

    manifest.parquet            the manifest that was embedded (rows in the same order)
    shards/rows-00003.npy       manifest row numbers embedded in shard 3 (unreadable images left out)
    shards/vectors-00003.npy    their L2-normalised fp16 embeddings, written through a memory map
    shards/views-00003.npy      only with views (evaluation sets): (rows, views, dim) fp16 embeddings
                                of each image's extra views (``views.py``)
    shards/skipped-00003.parquet  path and reason of every image of shard 3 that was not embedded
    unreadable.parquet          the skipped images of all shards
    views.json                  the view names the shards were embedded with
    model.json                  the embedder's name and fingerprint the shards were embedded with
    embeddings.json             embedder name and fingerprint (the model's identity), dimension, dedup
                                thresholds and the model they were calibrated for, views, shard list,
                                counts: written LAST

Shard ``i`` always covers manifest rows ``[i * shard_size, (i + 1) * shard_size)``, so a rerun skips
every shard already on disk (resume) and, under torchrun, rank ``r`` of ``w`` takes the shards
``i % w == r``. Images stream through a DataLoader (decoded in worker processes) batch by batch, and a
shard's vectors are appended to a raw file as they come, so memory does not grow with the shard size;
the shard's files are written under temporary names and renamed when complete (vectors last). A folder
without ``embeddings.json`` is incomplete and is refused by ``load_embeddings``.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dinov2.atomic import write_json, write_table
from dinov2.configuration.curation import DEFAULT_MAX_PIXELS
from dinov2.curation.manifest import UNREADABLE_SCHEMA, ManifestError, read_manifest
from dinov2.curation.views import View, expand, parse_views, views_per_image
from dinov2.data.images import SkippedImages, try_read_rgb

if TYPE_CHECKING:
    from dinov2.curation.embedders import Embedder

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
    fingerprint: str
    thresholds_calibrated_for: str
    folder: Path
    views: np.ndarray | None = None  # (n, views, dim): extra views of row i in views[i]
    view_names: tuple[str, ...] = ()

    @property
    def thresholds_calibrated(self) -> bool:
        """Whether the recorded dedup thresholds were measured for the model that made these embeddings."""
        return self.thresholds_calibrated_for == self.embedder

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


def skipped_path(folder: Path, shard: int) -> Path:
    return folder / "shards" / f"skipped-{shard:05d}.parquet"


def _shard_done(folder: Path, shard: int, with_views: bool) -> bool:
    paths = [*shard_paths(folder, shard), skipped_path(folder, shard)]
    paths += [views_path(folder, shard)] if with_views else []
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


def _drop_shards_of_another_setup(out: Path, manifest: pa.Table, views: list[str], model: dict[str, str]) -> None:
    """Resuming is only sound over the same rows, views and model: shards of anything else are deleted."""
    previous = out / "manifest.parquet"
    if previous.is_file() and not read_manifest(previous, check_files=False).equals(manifest):
        logger.info("%s held embeddings of another manifest: starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)
    recorded = out / "views.json"
    if (out / "shards").is_dir() and (json.loads(recorded.read_text()) if recorded.is_file() else []) != views:
        logger.info("%s held embeddings of other views: starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)
    recorded = out / "model.json"
    if (out / "shards").is_dir() and (json.loads(recorded.read_text()) if recorded.is_file() else {}) != model:
        logger.info("%s held embeddings of another model: starting over", out)
        shutil.rmtree(out / "shards", ignore_errors=True)


class _ManifestImages(Dataset):
    """Manifest row -> (row, the image and its extra views preprocessed, None), or (row, None, reason).

    Runs in DataLoader workers: decoding (bounded by ``max_pixels``) and preprocessing happen there,
    so the embedding process only ever holds preprocessed batches.
    """

    def __init__(self, paths: list[str], preprocess, views: list[View], max_pixels: int | None):
        self.paths, self.preprocess, self.views, self.max_pixels = paths, preprocess, views, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor | None, str | None]:
        skipped = SkippedImages()
        image = try_read_rgb(self.paths[row], skipped, self.max_pixels)
        if image is None:
            return row, None, skipped.reasons[0]
        return row, torch.stack([self.preprocess(view) for view in [image, *expand(image, self.views)]]), None


@dataclass
class _Batch:
    rows: list[int]  # every manifest row of the batch, readable or not
    readable: list[int]
    samples: torch.Tensor | None  # (len(readable), 1 + views, ...)
    skipped: list[tuple[int, str]]


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> _Batch:
    readable = [(row, sample) for row, sample, _ in items if sample is not None]
    return _Batch(
        rows=[row for row, _, _ in items],
        readable=[row for row, _ in readable],
        samples=torch.stack([sample for _, sample in readable]) if readable else None,
        skipped=[(row, reason) for row, sample, reason in items if sample is None],
    )


def _shard_batches(shards: list[int], shard_size: int, n_rows: int, batch_size: int) -> list[list[int]]:
    """Manifest rows in batches of ``batch_size`` that never straddle two shards."""
    batches = []
    for shard in shards:
        stop = min((shard + 1) * shard_size, n_rows)
        batches += [
            list(range(start, min(start + batch_size, stop))) for start in range(shard * shard_size, stop, batch_size)
        ]
    return batches


def _npy_from_raw(raw: Path, target: Path, shape: tuple[int, ...]) -> None:
    """A .npy of fp16 ``shape`` from a file of its raw values (the count is only known once a shard is done)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
    with open(target, "wb") as out, open(raw, "rb") as values:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(values, out, 1 << 20)


class _ShardWriter:
    """Appends one shard's vectors to raw files as batches arrive; ``finish`` turns them into the shard files."""

    def __init__(self, folder: Path, shard: int, dim: int, view_count: int, paths: list[str]):
        self.folder, self.shard, self.dim, self.view_count, self.paths = folder, shard, dim, view_count, paths
        self.rows: list[int] = []
        self.skipped: list[tuple[int, str]] = []
        self.raw_vectors = folder / "shards" / f".vectors-{shard:05d}.raw.partial"
        self.raw_views = folder / "shards" / f".views-{shard:05d}.raw.partial"
        self.vectors_file = open(self.raw_vectors, "wb")
        self.views_file = open(self.raw_views, "wb") if view_count else None

    def add(self, batch: _Batch, vectors: np.ndarray) -> None:
        """``vectors``: (len(batch.readable), 1 + views, dim), each image's own vector first."""
        self.rows += batch.readable
        self.skipped += batch.skipped
        self.vectors_file.write(np.ascontiguousarray(vectors[:, 0], dtype=np.float16).tobytes())
        if self.views_file is not None:
            self.views_file.write(np.ascontiguousarray(vectors[:, 1:], dtype=np.float16).tobytes())

    def _partials(self) -> list[Path]:
        rows_path, vectors_path = shard_paths(self.folder, self.shard)
        finals = [rows_path, vectors_path, skipped_path(self.folder, self.shard), views_path(self.folder, self.shard)]
        return [final.with_name(f".{final.name}.partial{final.suffix}") for final in finals]

    def finish(self) -> None:
        """Write rows, vectors, views and skipped files under temporary names, then rename; vectors last."""
        self.vectors_file.close()
        if self.views_file is not None:
            self.views_file.close()
        rows_path, vectors_path = shard_paths(self.folder, self.shard)
        partial_rows, partial_vectors, partial_skipped, partial_views = self._partials()
        try:
            np.save(partial_rows, np.asarray(self.rows, dtype=np.int64))
            _npy_from_raw(self.raw_vectors, partial_vectors, (len(self.rows), self.dim))
            skipped = pa.table(
                {"path": [self.paths[row] for row, _ in self.skipped], "reason": [r for _, r in self.skipped]},
                schema=UNREADABLE_SCHEMA,
            )
            pq.write_table(skipped, partial_skipped)
            if self.views_file is not None:
                _npy_from_raw(self.raw_views, partial_views, (len(self.rows), self.view_count, self.dim))
                os.replace(partial_views, views_path(self.folder, self.shard))
            os.replace(partial_skipped, skipped_path(self.folder, self.shard))
            os.replace(partial_rows, rows_path)
            os.replace(partial_vectors, vectors_path)
        finally:
            self.discard()

    def discard(self) -> None:
        self.vectors_file.close()
        if self.views_file is not None:
            self.views_file.close()
        for path in [self.raw_vectors, self.raw_views, *self._partials()]:
            path.unlink(missing_ok=True)


def _embed_shards(
    embedder: "Embedder",
    paths: list[str],
    folder: Path,
    shards: list[int],
    shard_size: int,
    batch_size: int,
    views: list[View],
    num_workers: int,
    max_pixels: int | None,
    bar: tqdm,
) -> int:
    """Decode, preprocess (in ``num_workers`` worker processes) and embed the given shards; returns images embedded."""
    if not shards:
        return 0
    loader = DataLoader(
        _ManifestImages(paths, embedder.preprocess, views, max_pixels),
        batch_sampler=_shard_batches(shards, shard_size, len(paths), batch_size),
        num_workers=num_workers,
        collate_fn=_collate,
    )
    view_count = views_per_image(views)
    writer: _ShardWriter | None = None
    embedded = 0
    try:
        for batch in loader:
            shard = batch.rows[0] // shard_size
            if writer is None or writer.shard != shard:
                if writer is not None:
                    writer.finish()
                writer = _ShardWriter(folder, shard, embedder.dim, view_count, paths)
            if batch.samples is not None:
                flat = embedder.embed_batch(batch.samples.flatten(0, 1))
                if flat.shape[1] != embedder.dim:
                    raise EmbeddingError(f"{embedder.name} returned {flat.shape[1]} values, announced {embedder.dim}")
                writer.add(batch, flat.reshape(len(batch.readable), 1 + view_count, embedder.dim))
                embedded += len(batch.readable)
            else:
                writer.add(batch, np.zeros((0, 1 + view_count, embedder.dim), dtype=np.float16))
            bar.update(len(batch.rows))
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    return embedded


def embed_manifest(
    manifest_path: str | Path,
    out: str | Path,
    embedder: "Embedder",
    batch_size: int,
    shard_size: int,
    views: list[str] | None = None,
    num_workers: int = 0,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> dict:
    """Embed every image of a manifest into ``out`` (resumable, sharded over torchrun ranks).

    Images are decoded and preprocessed in ``num_workers`` DataLoader workers (0: in this process) and
    embedded ``batch_size`` at a time, so memory does not grow with ``shard_size``. ``views`` (names as
    in ``views.py``) also embeds those extra views of every image. Images over ``max_pixels`` are
    decoded at a reduced size (JPEG) or skipped; every skipped image is listed with its reason in
    ``unreadable.parquet``.
    """
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    view_names = list(views or [])
    parsed_views = parse_views(view_names)
    manifest = read_manifest(manifest_path)
    out = Path(out)
    rank, world = _distributed()
    meta_path = out / META_FILE
    if rank == 0:
        meta_path.unlink(missing_ok=True)
        model = {"embedder": embedder.name, "fingerprint": embedder.fingerprint}
        _drop_shards_of_another_setup(out, manifest, view_names, model)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        write_table(manifest, out / "manifest.parquet")
        write_json(view_names, out / "views.json", sort_keys=False)
        write_json(model, out / "model.json", sort_keys=False)
    if world > 1:
        dist.barrier()
    paths = manifest.column("path").to_pylist()
    n_shards = (len(paths) + shard_size - 1) // shard_size
    mine = [shard for shard in range(n_shards) if shard % world == rank]
    todo = [shard for shard in mine if not _shard_done(out, shard, bool(parsed_views))]
    start = time.perf_counter()
    with tqdm(total=sum(min(shard_size, len(paths) - s * shard_size) for s in todo), desc="embed", unit="img") as bar:
        embedded = _embed_shards(
            embedder, paths, out, todo, shard_size, batch_size, parsed_views, num_workers, max_pixels, bar
        )
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
        skipped = [pq.read_table(skipped_path(out, shard)) for shard in range(n_shards)]
        write_table(pa.concat_tables(skipped), out / "unreadable.parquet")
        meta = {
            "embedder": embedder.name,
            "fingerprint": embedder.fingerprint,
            "dim": embedder.dim,
            "dtype": "float16",
            "shard_size": shard_size,
            "shards": n_shards,
            "thresholds": embedder.thresholds,
            "thresholds_calibrated_for": embedder.thresholds_calibrated_for,
            "views": view_names,
            **{key: summary[key] for key in ("images", "embedded", "unreadable")},
        }
        write_json(meta, meta_path, sort_keys=False)
    logger.info("embedded %d images at %.1f img/s", embedded, summary["images_per_second"])
    return summary


def load_embeddings(folder: str | Path, expected_dim: int | None = None) -> EmbeddingSet:
    """All shards of a complete embedding folder as one float32 matrix, rows aligned with the manifest."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise EmbeddingError(f"{folder} is not a complete embedding folder (no {META_FILE}); run `dinov2 embed`")
    meta = json.loads(meta_path.read_text())
    unrecorded = [key for key in ("fingerprint", "thresholds_calibrated_for") if key not in meta]
    if unrecorded:
        raise EmbeddingError(
            f"{meta_path} does not record the model's identity ({', '.join(unrecorded)}): rerun `dinov2 embed`"
        )
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
        manifest=manifest.take(pa.array(all_rows)),
        vectors=matrix,
        embedder=meta["embedder"],
        thresholds=meta["thresholds"],
        fingerprint=meta["fingerprint"],
        thresholds_calibrated_for=meta["thresholds_calibrated_for"],
        folder=folder,
        views=all_views,
        view_names=view_names,
    )


def check_same_model(reference: EmbeddingSet, other: EmbeddingSet) -> None:
    """Vectors of two models are not comparable even at the same dimension: refuse to mix them."""
    if other.fingerprint != reference.fingerprint:
        raise EmbeddingError(
            f"{other.folder} holds {other.dim}-d embeddings of {other.embedder} ({other.fingerprint}) and "
            f"{reference.folder} {reference.dim}-d embeddings of {reference.embedder} ({reference.fingerprint}): "
            "embed every set with the same model"
        )


def embedder_name(model: str) -> str:
    """The ``embedder`` that embeddings of ``model`` (an ``embed.model`` value) record in embeddings.json."""
    return Path(model).name if model.endswith(".safetensors") else model
