"""Labelled image folders for the evaluations, read robustly.

Layout: ``<root>/<class_name>/<image>`` (torchvision's ImageFolder layout, the layout of
``<root>/{train,test}`` in the usual classification sets). Class indices follow the sorted class
folder names. An unreadable image is skipped and counted (``dataset.skipped``): ``__getitem__``
returns ``None`` for it and ``collate_readable`` drops it from the batch. Reading is the
pretraining datasets' (dinov2.data.datasets); this module adds what a labelled eval needs.
"""

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate

from dinov2.data.datasets import ImageFolderDataset
from dinov2.data.images import IMAGE_SUFFIXES, try_read_rgb


class LabelledImageFolder(ImageFolderDataset):
    """(image_tensor, class_index) pairs from ``<root>/<class>/<image>``: the pretraining reader, plus the
    checks a classification eval needs (every image in a class folder, no empty class) and a fingerprint."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {root}")
        class_folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not class_folders:
            found = f"{len(loose)} images lie directly in it" if loose else "it holds no class folders"
            raise ValueError(
                f"labels missing for {root}: a classification eval needs <root>/<class>/<image> and {found}"
            )
        if loose:
            raise ValueError(
                f"labels missing for {len(loose)} images directly under {root} (e.g. {loose[0]}): "
                "put every image in its class folder"
            )
        super().__init__(root, transform=transform)
        empty = sorted(set(class_folders) - set(self.classes))
        if empty:
            raise ValueError(f"class folder {root / empty[0]} holds no images")

    def read(self, index: int) -> Image.Image | None:
        return try_read_rgb(self.paths[index], self.skipped)

    @property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed, renamed or rewritten (path, size and mtime)."""
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for path, label in zip(self.paths, self.labels, strict=True):
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


def check_same_classes(train: LabelledImageFolder, test: LabelledImageFolder) -> None:
    """Both splits must name the same classes, or the class indices would not line up."""
    if train.classes == test.classes:
        return
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    raise ValueError(
        f"class mismatch between {train.root} ({len(train.classes)} classes) and {test.root} "
        f"({len(test.classes)} classes): only in train {only_train[:5]}, only in test {only_test[:5]}"
    )


def collate_readable(batch: Sequence[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """default_collate over the readable items; ``None`` when none of the batch could be read."""
    readable = [item for item in batch if item is not None]
    if not readable:
        return None
    return default_collate(readable)
