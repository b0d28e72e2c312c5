"""Pretraining datasets: any folder of images, or a Parquet manifest written by the curation stages.

`dataset[i]` is `(transform(image), label)`, or `None` when the file cannot be decoded (missing,
truncated, not an image): the file is logged and counted in `dataset.skipped`, and the collate
function drops the `None` and reports it as "n_skipped", so one bad JPEG never stops a run.
With DataLoader workers each worker counts in its own copy of the dataset; "n_skipped" of the
batches is the count that reaches the training process. Images are read as the curation stages read
them (``dinov2.data.images.read_rgb``): a JPEG over ``DEFAULT_MAX_PIXELS`` (40 megapixels) is decoded
at 1/2, 1/4 or 1/8 scale, any other image over it skipped, so one huge file cannot exhaust a worker.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from dinov2.data.images import DEFAULT_MAX_PIXELS, SkippedImages, list_images, try_read_rgb

UNLABELED = -1


class _ImageFileDataset:
    """Images at known paths with integer labels; the transform may take a per-sample generator."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable | None) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, generator: torch.Generator | None = None) -> tuple[Any, int] | None:
        """The sample at `index`; `generator` is passed to the transform so its randomness is reproducible."""
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.paths)} images")
        image = try_read_rgb(self.paths[index], self.skipped, DEFAULT_MAX_PIXELS)
        if image is None:
            return None
        if self.transform is None:
            sample = image
        elif generator is None:
            sample = self.transform(image)
        else:
            sample = self.transform(image, generator=generator)
        return sample, self.labels[index]

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
        labels = [
            UNLABELED if path.parent == self.root else class_index[path.relative_to(self.root).parts[0]]
            for path in paths
        ]
        super().__init__(paths, labels, transform)


class ManifestDataset(_ImageFileDataset):
    """Images listed in a Parquet manifest with columns `id`, `path` and optionally `label`.

    Relative paths are resolved against `root`, which defaults to the manifest's folder. Integer
    labels are kept as they are (null -> -1); string labels become indices into the sorted
    `classes`. Files are not opened here (a manifest may list millions): a missing one is skipped
    and counted when it is read.
    """

    def __init__(self, parquet_path: str | Path, transform: Callable | None = None, root: str | Path | None = None):
        self.parquet_path = Path(parquet_path)
        if not self.parquet_path.is_file():
            raise FileNotFoundError(f"manifest not found: {self.parquet_path}")
        columns = pq.read_schema(self.parquet_path).names
        missing = [name for name in ("id", "path") if name not in columns]
        if missing:
            raise ValueError(
                f"manifest {self.parquet_path} lacks column(s) {', '.join(missing)} (it has: {', '.join(columns)})"
            )
        table = pq.read_table(self.parquet_path, columns=[c for c in ("id", "path", "label") if c in columns])
        if table.num_rows == 0:
            raise ValueError(f"manifest {self.parquet_path} lists no images")
        self.root = Path(root) if root is not None else self.parquet_path.parent
        self.ids = table.column("id").to_pylist()
        raw_paths = table.column("path").to_pylist()
        if any(path is None or path == "" for path in raw_paths):
            raise ValueError(f"manifest {self.parquet_path} has empty values in column 'path'")
        paths = [path if Path(path).is_absolute() else self.root / path for path in map(Path, raw_paths)]
        self.classes: list[str] = []
        if "label" not in columns:
            labels = [UNLABELED] * len(paths)
        else:
            raw_labels = table.column("label").to_pylist()
            if any(isinstance(label, str) for label in raw_labels):
                self.classes = sorted({label for label in raw_labels if label is not None})
                class_index = {name: i for i, name in enumerate(self.classes)}
                labels = [UNLABELED if label is None else class_index[label] for label in raw_labels]
            else:
                labels = [UNLABELED if label is None else int(label) for label in raw_labels]
        super().__init__(paths, labels, transform)
