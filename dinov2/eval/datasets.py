"""Labelled image folders for the evaluations, read robustly.

Layout: ``<root>/<class_name>/<image>`` (torchvision's ImageFolder layout, the layout of
``<root>/{train,test}`` in the usual classification sets). Class indices follow the sorted class
folder names. An unreadable image is skipped and counted (``dataset.skipped``): ``__getitem__``
returns ``None`` for it and ``collate_readable`` drops it from the batch.
"""

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import default_collate

from dinov2.data.images import IMAGE_SUFFIXES, SkippedImages, list_images, try_read_rgb


class LabelledImageFolder(torch.utils.data.Dataset):
    """(image_tensor, class_index) pairs from ``<root>/<class>/<image>``."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        self.classes = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
        loose = [p.name for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.classes:
            found = f"{len(loose)} images lie directly in it" if loose else "it holds no class folders"
            raise ValueError(
                f"labels missing for {self.root}: a classification eval needs <root>/<class>/<image> and {found}"
            )
        if loose:
            raise ValueError(
                f"labels missing for {len(loose)} images directly under {self.root} (e.g. {loose[0]}): "
                "put every image in its class folder"
            )
        self.samples: list[tuple[Path, int]] = []
        for index, name in enumerate(self.classes):
            try:
                files = list_images(self.root / name)
            except ValueError:
                raise ValueError(f"class folder {self.root / name} holds no images") from None
            self.samples.extend((path, index) for path in files)
        self.transform = transform
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def read(self, index: int) -> Image.Image | None:
        return try_read_rgb(self.samples[index][0], self.skipped)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        image = self.read(index)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), self.samples[index][1]

    @property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed, renamed or rewritten (path, size and mtime)."""
        digest = hashlib.sha256(str(self.root.resolve()).encode())
        for path, label in self.samples:
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
