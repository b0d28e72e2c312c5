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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dinov2.atomic import output_folder, write_json, write_table
from dinov2.configuration.curation import CopyEditRanges, DefaultData, PrepareParams
from dinov2.copydetect.edits import Edit, describe, draw_edits, write_copy
from dinov2.curation.manifest import content_hash, prepare
from dinov2.curation.report import image_grid
from dinov2.data.images import grey_thumbnail
from dinov2.demo_data.bundled import DISTRACTOR_PHOTOS, MNIST_DIGITS, SIDE, distractor_photo, mnist_digits
from dinov2.demo_data.ground_truth import GROUND_TRUTH_SCHEMA, POOL_SOURCE
from dinov2.demo_data.sources import ImageFolderSource, Source, open_source


def manifest_sources(name: str) -> dict[str, str]:
    """The ``source`` of each manifest, for a data source named ``name``."""
    return {
        "seed": f"{name}_seed",
        "pool": POOL_SOURCE,
        "eval_train": f"{name}_eval_train",
        "eval_test": f"{name}_eval_test",
    }


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


def select(source: Source, sizes: DefaultData, rng: np.random.Generator) -> Selection:
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
    write_table(table.set_column(index, "path", pa.array(paths, pa.string())), table_path)


def build_default_data(out: Path, sizes: DefaultData) -> dict[str, int]:
    """Write the data folder (layout in the module docstring); returns its counts (metrics.json)."""
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

    with output_folder(out, ("plots",)) as folder:
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
            path, edits = _plant(image, planted / f"duplicate_{number:04d}", rng, pool_hashes, sizes.edits)
            original = f"pool/{source.name}/{source.file_name('train', index)}"
            rows.append(_row(folder, path, "pool_duplicate", original, original, describe(edits)))
        for number, index in enumerate(chosen.test_copied):
            image = source.image("test", index)
            path, edits = _plant(image, planted / f"test_copy_{number:04d}", rng, pool_hashes, sizes.edits)
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
        write_table(pa.Table.from_pylist(rows, schema=GROUND_TRUTH_SCHEMA), folder / "ground_truth.parquet")

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
            write_table(source.skipped(), folder / "source_skipped.parquet")

        shown = _planted_examples(folder, rows)
        image_grid(shown).save(folder / "plots" / "planted_copies.png")
        write_json(metrics, folder / "metrics.json")
    return metrics


def _plant(
    image: Image.Image, stem: Path, rng: np.random.Generator, pool_hashes: set[str], ranges: CopyEditRanges
) -> tuple[Path, list[Edit]]:
    """Write an edited copy whose bytes are new to the pool (the manifest would collapse an exact copy, e.g.
    a second plain flip of the same original), drawing the edits again until they are."""
    while True:
        edits = draw_edits(rng, image.size, ranges)
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
