"""Pretraining datasets: any folder of images, or a Parquet manifest written by the curation stages.

`dataset[i]` is `(transform(image), label)`, or `None` when the file cannot be decoded (missing,
truncated, not an image): the file is logged and counted in `dataset.skipped`, and the pretraining
loader replaces it by another image and reports it as "n_skipped", so one bad JPEG never stops a run.
With DataLoader workers each worker counts in its own copy of the dataset; "n_skipped" of the
batches is the count that reaches the training process. Images are read as the curation stages read
them (``dinov2.data.images.read_rgb``): a JPEG over ``DEFAULT_MAX_PIXELS`` is decoded
at 1/2, 1/4 or 1/8 scale, any other image over it skipped, so one huge file cannot exhaust a worker.
A manifest is read through Arrow, never as one Python object per image (``ManifestDataset``), so it
scales to the 10^8 images of LVD-142M.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dinov2.configuration.curation import DEFAULT_MAX_PIXELS
from dinov2.data.images import SkippedImages, list_images, try_read_rgb

UNLABELED = -1
# Rows per record batch of a manifest index: 2^18 paths of ~100 bytes keep Arrow's 32-bit string
# offsets far from overflowing and make a batch a few MB of contiguous memory.
_INDEX_ROWS_PER_BATCH = 1 << 18
# Bumped whenever the index file's layout changes, so an old index is never read as a new one.
_INDEX_FORMAT = 1


class _ImageFileDataset:
    """Images at known paths with integer labels; the transform may take a per-sample generator.
    Subclasses say where image `index` is (`path_at`) and its label (`label_at`)."""

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        raise NotImplementedError

    def path_at(self, index: int) -> Path:
        raise NotImplementedError

    def label_at(self, index: int) -> int:
        raise NotImplementedError

    def load(self, index: int, generator: torch.Generator | None = None) -> tuple[Any, int] | None:
        """The sample at `index`; `generator` is passed to the transform so its randomness is reproducible."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        image = try_read_rgb(self.path_at(index), self.skipped, DEFAULT_MAX_PIXELS)
        if image is None:
            return None
        if self.transform is None:
            sample = image
        elif generator is None:
            sample = self.transform(image)
        else:
            sample = self.transform(image, generator=generator)
        return sample, self.label_at(index)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        return self.load(index)


class ImageFolderDataset(_ImageFileDataset):
    """Images under `root`, searched recursively; the class is the first-level subfolder.

    Class indices follow the sorted subfolder names (`classes`). Images directly in `root` (a flat
    folder) get the label -1. Files are recognised by suffix (dinov2.data.images.IMAGE_SUFFIXES);
    other files, such as a README.txt, are not part of the dataset.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        self.root = Path(root)
        paths = list_images(self.root)
        class_names = sorted({path.relative_to(self.root).parts[0] for path in paths if path.parent != self.root})
        self.classes = class_names
        class_index = {name: i for i, name in enumerate(class_names)}
        self.paths: list[Path] = paths
        self.labels = [
            UNLABELED if path.parent == self.root else class_index[path.relative_to(self.root).parts[0]]
            for path in paths
        ]
        super().__init__(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def path_at(self, index: int) -> Path:
        return self.paths[index]

    def label_at(self, index: int) -> int:
        return self.labels[index]


def default_index_dir() -> Path:
    """Where manifest indexes are kept: ``$XDG_CACHE_HOME/dinov2/manifests`` (``~/.cache`` by default),
    outside any DVC-tracked output and on the machine's own disk, shared by every run on it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dinov2" / "manifests"


class ManifestDataset(_ImageFileDataset):
    """Images listed in a Parquet manifest with columns `id`, `path` and optionally `label`.

    Relative paths are resolved against `root`, which defaults to the manifest's folder. Integer
    labels are kept as they are (null -> -1); string labels become indices into the sorted
    `classes`. Files are not opened here (a manifest may list millions): a missing one is skipped
    and counted when it is read.

    The manifest is read once, in record batches, into an index: an uncompressed Arrow IPC file with
    the `path` and `label` columns, in `index_dir` (``default_index_dir()``), named after the
    manifest's path, size and modification time. The index is memory-mapped, so every rank and
    DataLoader worker on a machine shares one copy in the page cache and holds no Python object per
    image; a path is decoded when its image is read. Ranks that open the same manifest at once build
    its index once (a file lock), then map it.
    """

    def __init__(
        self,
        parquet_path: str | Path,
        transform: Callable | None = None,
        root: str | Path | None = None,
        index_dir: str | Path | None = None,
    ):
        super().__init__(transform)
        self.parquet_path = Path(parquet_path)
        if not self.parquet_path.is_file():
            raise FileNotFoundError(f"manifest not found: {self.parquet_path}")
        columns = pq.read_schema(self.parquet_path).names
        missing = [name for name in ("id", "path") if name not in columns]
        if missing:
            raise ValueError(
                f"manifest {self.parquet_path} lacks column(s) {', '.join(missing)} (it has: {', '.join(columns)})"
            )
        if pq.ParquetFile(self.parquet_path).metadata.num_rows == 0:
            raise ValueError(f"manifest {self.parquet_path} lists no images")
        self.root = Path(root) if root is not None else self.parquet_path.parent
        self.index_path = manifest_index(self.parquet_path, Path(index_dir) if index_dir else default_index_dir())
        self._map_index()

    def _map_index(self) -> None:
        table = pa.ipc.open_file(pa.memory_map(str(self.index_path))).read_all()
        self._paths = table.column("path").chunks
        self._labels = table.column("label").chunks
        self._batch_starts = np.cumsum([0] + [len(chunk) for chunk in self._paths])
        self.classes: list[str] = json.loads(table.schema.metadata[b"classes"])

    def __getstate__(self) -> dict[str, Any]:
        # A worker started by spawn maps the index itself instead of receiving a pickled copy of it.
        return {k: v for k, v in self.__dict__.items() if k not in ("_paths", "_labels", "_batch_starts")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._map_index()

    def __len__(self) -> int:
        return int(self._batch_starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        batch = int(np.searchsorted(self._batch_starts, index, side="right")) - 1
        return batch, index - int(self._batch_starts[batch])

    def path_at(self, index: int) -> Path:
        batch, row = self._locate(index)
        path = Path(self._paths[batch][row].as_py())
        return path if path.is_absolute() else self.root / path

    def label_at(self, index: int) -> int:
        batch, row = self._locate(index)
        return self._labels[batch][row].as_py()


def manifest_index(parquet_path: Path, index_dir: Path) -> Path:
    """The Arrow IPC index of a Parquet manifest (see ``ManifestDataset``), written if it does not exist."""
    stat = parquet_path.stat()
    identity = f"{_INDEX_FORMAT}|{parquet_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index = index_dir / f"{parquet_path.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.arrow"
    if index.is_file():
        return index
    index_dir.mkdir(parents=True, exist_ok=True)
    with open(index.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank of this machine may be writing it right now
        if not index.is_file():
            partial = index.with_name(f".{index.name}.{os.getpid()}.partial")
            try:
                _write_index(parquet_path, partial)
                partial.rename(index)
            finally:
                partial.unlink(missing_ok=True)
                # Arrow's allocator keeps what the conversion freed; DataLoader workers forked later would map it
                pa.default_memory_pool().release_unused()
    return index


def _write_index(parquet_path: Path, destination: Path) -> None:
    manifest = pq.ParquetFile(parquet_path)
    label_type = manifest.schema_arrow.field("label").type if "label" in manifest.schema_arrow.names else None
    classes: list[str] = []
    if label_type is not None and (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        names: set[str] = set()
        for batch in manifest.iter_batches(batch_size=_INDEX_ROWS_PER_BATCH, columns=["label"]):
            names.update(name for name in pc.unique(batch.column("label")).to_pylist() if name is not None)
        classes = sorted(names)
    schema = pa.schema([("path", pa.string()), ("label", pa.int64())], metadata={"classes": json.dumps(classes)})
    read = ["path"] if label_type is None else ["path", "label"]
    with pa.ipc.new_file(str(destination), schema) as writer:
        for batch in manifest.iter_batches(batch_size=_INDEX_ROWS_PER_BATCH, columns=read):
            paths = batch.column("path").cast(pa.string())
            if paths.null_count or pc.any(pc.equal(pc.utf8_length(paths), 0)).as_py():
                raise ValueError(f"manifest {parquet_path} has empty values in column 'path'")
            if label_type is None:
                labels = pa.array(np.full(len(paths), UNLABELED, dtype=np.int64))
            elif classes:
                labels = pc.index_in(batch.column("label"), value_set=pa.array(classes)).cast(pa.int64())
            else:
                labels = batch.column("label").cast(pa.int64())
            writer.write_batch(pa.record_batch([paths, labels.fill_null(UNLABELED)], schema=schema))
