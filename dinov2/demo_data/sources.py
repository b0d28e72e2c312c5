"""Where the default data is cut from: Fashion-MNIST, or an image folder in torchvision's ImageFolder layout.

Both give, per split (``train``, ``test``), labelled images by index: ``usable``, ``size``, ``file_name``,
``image`` and ``write`` (a folder's files are copied byte for byte).
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image

from dinov2.configuration.curation import DEFAULT_MAX_PIXELS
from dinov2.curation.manifest import UNREADABLE_SCHEMA, content_hash
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinov2.data.images import SkippedImages, read_rgb, scan_images, try_read_rgb
from dinov2.demo_data.bundled import FASHION_MNIST, SIDE

if TYPE_CHECKING:
    from dinov2.configuration.curation import DefaultData

SPLITS = ("train", "test")


def _save_grey(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


class FashionMnistSource:
    """Fashion-MNIST's 60,000 train and 10,000 test images, 28 x 28 grey, written as PNG files."""

    name = "fashion"
    classes = FASHION_MNIST_CLASSES

    def __init__(self) -> None:
        self.pixels: dict[str, np.ndarray] = {}
        self.labels: dict[str, np.ndarray] = {}
        for split in SPLITS:
            self.pixels[split], self.labels[split] = load_fashion_mnist(train=split == "train")

    def usable(self, split: str, index: int) -> bool:
        return True

    def size(self, split: str, index: int) -> tuple[int, int]:
        return SIDE, SIDE

    def file_name(self, split: str, index: int) -> str:
        return f"{split}_{index}.png"

    def image(self, split: str, index: int) -> Image.Image:
        return Image.fromarray(self.pixels[split][index], mode="L")

    def write(self, split: str, index: int, path: Path) -> None:
        _save_grey(self.pixels[split][index], path)


@dataclass
class ImageFolderSource:
    """A labelled folder, ``<root>/{train,test}/<class>/`` with images of any size and mode, files listed by
    ``scan_images`` (recursively inside a class folder; folders whose name starts with "." are not classes).

    A file is usable when ``read_rgb`` decodes it and its bytes are new: an exact copy of a file already
    chosen would be collapsed by the manifest, or be an unrecorded copy of a test image in the pool. Only the
    files the draw reaches are decoded; those left out are recorded as they are met (``skipped``).
    """

    name = "folder"
    root: Path
    classes: tuple[str, ...]
    files: dict[str, list[Path]]
    labels: dict[str, np.ndarray]
    unreadable: SkippedImages
    exact_copies: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    _usable: dict[tuple[str, int], bool] = field(default_factory=dict, init=False)
    _sizes: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict, init=False)
    _chosen: dict[str, Path] = field(default_factory=dict, init=False)  # content hash -> the file chosen with it

    @classmethod
    def open(cls, root: Path, sizes: "DefaultData") -> "ImageFolderSource":
        """List the folder and check that it can supply ``sizes``: each problem is a one-line error naming it."""
        if root.is_file():
            raise ValueError(f"prepare.default_data.source: {root} is a file, not an image folder")
        if not root.is_dir():
            raise FileNotFoundError(f"prepare.default_data.source: image folder not found: {root}")
        classes = {}
        for split in SPLITS:
            if not (root / split).is_dir():
                raise FileNotFoundError(
                    f"prepare.default_data.source: {root} has no {split}/ folder; "
                    f"expected {root}/train/<class>/ and {root}/test/<class>/"
                )
            with os.scandir(root / split) as entries:
                classes[split] = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
            if not classes[split]:
                raise ValueError(
                    f"prepare.default_data.source: {root / split} holds no class folders; "
                    f"expected {root / split}/<class>/<image files>"
                )
        if classes["train"] != classes["test"]:
            only_train = ", ".join(sorted(set(classes["train"]) - set(classes["test"]))) or "none"
            only_test = ", ".join(sorted(set(classes["test"]) - set(classes["train"]))) or "none"
            raise ValueError(
                f"prepare.default_data.source: the class folders of {root / 'train'} and {root / 'test'} differ: "
                f"only in train: {only_train}; only in test: {only_test}"
            )
        files: dict[str, list[Path]] = {}
        labels: dict[str, np.ndarray] = {}
        unreadable = SkippedImages()
        for split in SPLITS:
            files[split], split_labels = [], []
            for label, name in enumerate(classes["train"]):
                scan = scan_images(root / split / name)
                files[split] += scan.files
                split_labels += [label] * len(scan.files)
                unreadable.paths += scan.problems.paths
                unreadable.reasons += scan.problems.reasons
            labels[split] = np.array(split_labels, dtype=np.int64)
        source = cls(root, tuple(classes["train"]), files, labels, unreadable)
        source._check_counts(sizes)
        return source

    def _check_counts(self, sizes: "DefaultData") -> None:
        needs = {
            "train": ("seed_per_class + eval_train_per_class", sizes.seed_per_class + sizes.eval_train_per_class),
            "test": ("eval_test_per_class", sizes.eval_test_per_class),
        }
        for split, (what, need) in needs.items():
            counts = np.bincount(self.labels[split], minlength=len(self.classes))
            short = [f"'{name}' {count}" for name, count in zip(self.classes, counts, strict=True) if count < need]
            if short:
                shown = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
                raise ValueError(
                    f"prepare.default_data: {len(short)} of {len(self.classes)} classes hold fewer than {what} = "
                    f"{need} images in {self.root / split}: {shown}"
                )
        left = len(self.files["train"]) - len(self.classes) * needs["train"][1]
        if sizes.pool_images > left:
            raise ValueError(
                f"prepare.default_data: pool_images = {sizes.pool_images} exceeds the {left} images of "
                f"{self.root / 'train'} left after seed_per_class + eval_train_per_class"
            )
        test_images = len(self.classes) * sizes.eval_test_per_class
        if sizes.test_copies > test_images:
            raise ValueError(
                f"prepare.default_data: test_copies = {sizes.test_copies} exceeds the {test_images} evaluation test "
                f"images ({len(self.classes)} classes x eval_test_per_class = {sizes.eval_test_per_class})"
            )

    def usable(self, split: str, index: int) -> bool:
        if (split, index) not in self._usable:
            self._usable[split, index] = self._check(split, index)
        return self._usable[split, index]

    def _check(self, split: str, index: int) -> bool:
        path = self.files[split][index]
        image = try_read_rgb(path, self.unreadable, DEFAULT_MAX_PIXELS)
        if image is None:
            return False
        digest = content_hash(path)
        if digest in self._chosen:
            self.exact_copies.append((str(path), f"exact copy of {self._chosen[digest]}"))
            return False
        self._chosen[digest] = path
        self._sizes[split, index] = image.size
        return True

    def size(self, split: str, index: int) -> tuple[int, int]:
        return self._sizes[split, index]

    def file_name(self, split: str, index: int) -> str:
        return f"{split}_{index}{self.files[split][index].suffix.lower()}"

    def image(self, split: str, index: int) -> Image.Image:
        return read_rgb(self.files[split][index], DEFAULT_MAX_PIXELS)

    def write(self, split: str, index: int, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.files[split][index], path)

    def skipped(self) -> pa.Table:
        """The files left out: unreadable ones, then exact copies, each with the reason."""
        paths = [str(path) for path in self.unreadable.paths] + [path for path, _ in self.exact_copies]
        reasons = self.unreadable.reasons + [reason for _, reason in self.exact_copies]
        return pa.table({"path": paths, "reason": reasons}, schema=UNREADABLE_SCHEMA)


Source = FashionMnistSource | ImageFolderSource


def open_source(sizes: "DefaultData") -> Source:
    """The source ``sizes.source`` names, checked against the sizes; a relative path is relative to the working
    directory."""
    if sizes.source == FASHION_MNIST:
        return FashionMnistSource()
    return ImageFolderSource.open(Path(sizes.source).expanduser().absolute(), sizes)
