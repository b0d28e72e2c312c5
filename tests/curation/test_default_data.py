"""The pipeline's data: seed / pool / eval folders with planted copies, cut from Fashion-MNIST or from an image
folder, and how curation is scored."""

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dinov2.configuration.curation import DefaultData
from dinov2.copydetect.edits import parse_edits, write_copy
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinov2.data.images import read_rgb
from dinov2.demo_data.build import build_default_data
from dinov2.demo_data.bundled import photo
from dinov2.demo_data.ground_truth import score_curation


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "manifests" / name / "manifest.parquet").to_pylist()


def test_every_folder_holds_the_configured_counts(small_default_data):
    out, metrics = small_default_data
    assert metrics == {
        "prepare/seed_images": 20,
        "prepare/eval_train_images": 10,
        "prepare/eval_test_images": 20,
        "prepare/pool_images": 40 + 6 + 4 + 3 + 2,
        "prepare/pool_fashion_images": 40,
        "prepare/near_twins_left_out": 0,  # 40 of 55,000 images: none alike
        "prepare/planted_pool_duplicates": 6,
        "prepare/planted_test_copies": 4,
        "prepare/distractor_digits": 3,
        "prepare/distractor_photos": 2,
        **{f"prepare/{name}_unreadable": 0 for name in ("seed", "pool", "eval_train", "eval_test")},
    }
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in FASHION_MNIST_CLASSES:
        assert len(list((out / "seed" / name).glob("*.png"))) == 2
        assert len(list((out / "eval" / "train" / name).glob("*.png"))) == 1
        assert len(list((out / "eval" / "test" / name).glob("*.png"))) == 2
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    assert [row["kind"] for row in truth] == ["pool_duplicate"] * 6 + ["test_copy"] * 4 + ["distractor"] * 5
    assert (out / "plots" / "planted_copies.png").is_file()


def test_seed_pool_and_eval_are_disjoint_fashion_mnist_images_with_their_labels(small_default_data):
    out, _ = small_default_data
    train_images, train_labels = load_fashion_mnist(train=True)
    seed, eval_train = manifest(out, "seed"), manifest(out, "eval_train")
    pool = [row for row in manifest(out, "pool") if row["id"].startswith("pool/fashion/")]
    indices = {
        name: {int(Path(row["path"]).stem.removeprefix("train_")) for row in rows}
        for name, rows in (("seed", seed), ("eval_train", eval_train), ("pool", pool))
    }
    assert [len(found) for found in indices.values()] == [20, 10, 40]
    assert not (indices["seed"] & indices["pool"] or indices["seed"] & indices["eval_train"])
    assert not indices["pool"] & indices["eval_train"]
    for row in seed + eval_train:
        index = int(Path(row["path"]).stem.removeprefix("train_"))
        assert row["label"] == FASHION_MNIST_CLASSES[train_labels[index]]
        np.testing.assert_array_equal(np.asarray(Image.open(row["path"])), train_images[index])
    assert {row["split"] for row in seed} == {"seed"}
    assert {row["split"] for row in eval_train + manifest(out, "eval_test")} == {"eval"}
    assert {(row["split"], row["label"]) for row in manifest(out, "pool")} == {("pool", "")}
    # Manifests point at the finished folder, not at the temporary one it was written in.
    for name in ("seed", "pool", "eval_train", "eval_test"):
        assert all(row["path"].startswith(str(out.resolve()) + "/") for row in manifest(out, name))
        assert all(os.path.isfile(row["path"]) for row in manifest(out, name))


def test_the_ground_truth_names_real_files_and_its_edits_reproduce_every_copy(small_default_data, tmp_path):
    out, _ = small_default_data
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    pool_ids = {row["id"] for row in manifest(out, "pool")}
    eval_test_ids = {row["id"] for row in manifest(out, "eval_test")}
    for row in truth:
        assert row["id"] in pool_ids and (out / row["path"]).is_file()
        assert Image.open(out / row["path"]).size == (28, 28)
        if row["kind"] == "distractor":
            assert row["original_id"] == ""
            continue
        assert row["original_id"] in (pool_ids if row["kind"] == "pool_duplicate" else eval_test_ids)
        edits = parse_edits(row["edit"])
        assert 1 <= len(edits) <= 3 and len({edit.kind for edit in edits}) == len(edits)
        ranges = DefaultData().edits
        for edit in edits:
            low, high = {
                "crop": ranges.crop_kept,
                "rotate": (-ranges.rotation_degrees, ranges.rotation_degrees),
                "brightness": ranges.brightness,
                "jpeg": ranges.jpeg_quality,
            }.get(edit.kind, (None, None))
            assert edit.kind == "flip" or low <= edit.strength <= high
        assert Path(row["path"]).suffix == (".jpg" if any(edit.kind == "jpeg" for edit in edits) else ".png")
        # Applying the recorded edits to the original writes the planted file byte for byte.
        again = write_copy(Image.open(out / row["original"]), edits, tmp_path / "again")
        assert again.read_bytes() == (out / row["path"]).read_bytes()
        again.unlink()
    sources = [row["original"].partition(":")[0] for row in truth if row["kind"] == "distractor"]
    assert sources[:3] == ["mnist"] * 3 and len(sources) == 5 and set(sources[3:]) <= {"skimage", "sklearn"}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(
    small_default_data, small_default_sizes, tmp_path
):
    out, _ = small_default_data
    again = tmp_path / "again"
    build_default_data(again, DefaultData(**small_default_sizes))
    images = {name: data for name, data in files_under(out).items() if not name.startswith("manifests/")}
    assert images == {name: data for name, data in files_under(again).items() if not name.startswith("manifests/")}
    for name in ("seed", "pool", "eval_train", "eval_test"):
        first, second = manifest(out, name), manifest(again, name)
        assert [row["content_hash"] for row in first] == [row["content_hash"] for row in second]
    other = tmp_path / "other"
    build_default_data(other, DefaultData(**{**small_default_sizes, "seed": 1}))
    assert files_under(other / "seed") != files_under(out / "seed")
    assert files_under(other / "pool" / "planted") != files_under(out / "pool" / "planted")


# The ground truth of the small build (``small_default_data``) and a digest of its file names, recorded from the
# build before image folders became a source (commit d247441): which images went where, which copies with which edits.
SMALL_GROUND_TRUTH = [
    ("pool/planted/duplicate_0000.png", "pool/fashion/train_51217.png", "rotate:-8.7"),
    ("pool/planted/duplicate_0001.png", "pool/fashion/train_31162.png", "rotate:-1.5+brightness:0.84"),
    ("pool/planted/duplicate_0002.jpg", "pool/fashion/train_31162.png", "flip+brightness:1.16+jpeg:81"),
    ("pool/planted/duplicate_0003.png", "pool/fashion/train_31162.png", "flip"),
    ("pool/planted/duplicate_0004.png", "pool/fashion/train_45347.png", "crop:0.87@0,4+rotate:3.2"),
    ("pool/planted/duplicate_0005.png", "pool/fashion/train_45347.png", "flip+brightness:1.06"),
    ("pool/planted/test_copy_0000.png", "eval/test/coat/test_3617.png", "crop:0.88@1,2"),
    ("pool/planted/test_copy_0001.jpg", "eval/test/coat/test_2678.png", "flip+brightness:0.78+jpeg:75"),
    ("pool/planted/test_copy_0002.jpg", "eval/test/t-shirt_top/test_1403.png", "crop:0.85@1,2+brightness:1.23+jpeg:70"),
    ("pool/planted/test_copy_0003.png", "eval/test/sneaker/test_9553.png", "rotate:9.7+brightness:1.2"),
    ("pool/distractors/digit_1303.png", "mnist:1303", ""),
    ("pool/distractors/digit_3678.png", "mnist:3678", ""),
    ("pool/distractors/digit_4804.png", "mnist:4804", ""),
    ("pool/distractors/photo_gravel.png", "skimage:gravel", "resize:28"),
    ("pool/distractors/photo_microaneurysms.png", "skimage:microaneurysms", "resize:28"),
]
SMALL_FILE_NAMES_SHA256 = "cb1b7af0bfaa5cdc329433f0368f15ddba2084ed8fe442df2c20c109dba8bcdb"


def test_fashion_mnist_is_cut_as_before_image_folders_became_a_source(small_default_data):
    out, _ = small_default_data
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    assert [(row["path"], row["original"], row["edit"]) for row in truth] == SMALL_GROUND_TRUTH
    names = sorted(name for name in files_under(out) if not name.startswith("manifests/"))
    assert len(names) == 108
    assert hashlib.sha256("\n".join(names).encode()).hexdigest() == SMALL_FILE_NAMES_SHA256


@pytest.mark.slow
def test_a_killed_build_leaves_the_previous_folder_untouched_and_the_next_build_completes(
    tmp_path, small_default_sizes, start_dinov2, run_dinov2
):
    # a folder of its own (not small_default_data): its manifests name its files by absolute path, and the build
    # the test lets complete writes the same folder again
    build_default_data(tmp_path / "prepare", DefaultData(**small_default_sizes))
    before = files_under(tmp_path / "prepare")
    large = tmp_path / "large.yaml"
    large.write_text(
        yaml.safe_dump({"prepare": {"default_data": {**small_default_sizes, "seed": 1, "pool_images": 20_000}}})
    )
    killed = start_dinov2("prepare-default", "--out", "prepare", "--params", str(large), cwd=tmp_path, output=False)
    fashion = tmp_path / ".prepare.partial" / "pool" / "fashion"
    deadline = time.monotonic() + 120
    while not (fashion.is_dir() and any(fashion.iterdir())) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    assert files_under(tmp_path / "prepare") == before
    assert not (tmp_path / ".prepare.partial" / "ground_truth.parquet").exists()

    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"prepare": {"default_data": small_default_sizes}}))
    again = run_dinov2("prepare-default", "--out", "prepare", "--params", str(small), cwd=tmp_path, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "55 pool images" in output
    assert not (tmp_path / ".prepare.partial").exists()
    assert files_under(tmp_path / "prepare") == before


GROUPS = pa.schema([("id", pa.string()), ("representative", pa.string())])


def write_dedup_and_retrieve(folder: Path, groups: list[list[str]], kept: list[str], curated: list[str], pool: int):
    """What `dinov2 dedup` and `dinov2 retrieve` write, reduced to the columns scoring reads."""
    dedup, retrieve = folder / "dedup", folder / "retrieve"
    dedup.mkdir()
    retrieve.mkdir()
    members = [member for group in groups for member in group]
    representatives = [group[0] for group in groups for _ in group]
    pq.write_table(
        pa.table({"id": members, "representative": representatives}, schema=GROUPS), dedup / "duplicate_groups.parquet"
    )
    pq.write_table(pa.table({"id": kept}), dedup / "kept.parquet")
    (dedup / "metrics.json").write_text(json.dumps({"dedup/pool_images": pool}))
    pq.write_table(pa.table({"id": curated}), retrieve / "curated.parquet")
    return dedup, retrieve


def test_curation_is_scored_against_the_planted_ground_truth(tmp_path):
    """13 pool images: f0-f5 the pool's own, d0-d2 copies (d0 of f0, d1 and d2 of f1), t0 / t1 copies of
    eval images, x0 / x1 distractors."""

    def row(image_id, kind, original_id="", edit=""):
        return {
            "id": image_id,
            "path": image_id,
            "kind": kind,
            "original_id": original_id,
            "original": "",
            "edit": edit,
        }

    truth = [
        row("d0", "pool_duplicate", "f0", "flip"),
        row("d1", "pool_duplicate", "f1", "crop:0.9@1,1"),
        row("d2", "pool_duplicate", "f1", "jpeg:50"),
        row("t0", "test_copy", "e0", "rotate:5"),
        row("t1", "test_copy", "e1", "brightness:1.2"),
        row("x0", "distractor"),
        row("x1", "distractor"),
    ]
    pq.write_table(pa.Table.from_pylist(truth), tmp_path / "ground_truth.parquet")
    # Self-dedup: {f0, d0} right; {f1, d1, f2}: d1 right, f2 wrong; {x0, x1}: x1 wrong; {f3, t0}: t0 wrong.
    # Relative dedup then removes nothing more, so t1 (an eval copy) is kept and retrieved.
    groups = [["f0", "d0"], ["f1", "d1", "f2"], ["x0", "x1"], ["f3", "t0"]]
    kept = ["f0", "f1", "f3", "f4", "f5", "d2", "t1", "x0"]
    dedup, retrieve = write_dedup_and_retrieve(tmp_path, groups, kept, ["f0", "f1", "t1", "x0"], pool=13)
    scores = score_curation(tmp_path / "ground_truth.parquet", dedup, retrieve)
    assert scores == pytest.approx(
        {
            "curation/pool_duplicates": 3,
            "curation/pool_duplicates_found": 2,  # d0, d1
            "curation/self_dedup_removed": 5,  # d0, d1, f2, x1, t0
            "curation/pool_duplicate_recall": 2 / 3,
            "curation/pool_duplicate_precision": 2 / 5,
            "curation/pool_duplicate_recall_photometric": 1 / 2,  # d0 found, d2 not
            "curation/pool_duplicate_recall_geometric": 1.0,  # d1
            "curation/test_copies": 2,
            "curation/test_copies_in_curated": 1,
            "curation/test_copies_removed": 1 / 2,
            "curation/test_copies_removed_photometric": 0.0,  # t1
            "curation/test_copies_removed_geometric": 1.0,  # t0
            "curation/distractor_share_pool": 2 / 13,
            "curation/distractor_share_kept": 1 / 8,
            "curation/distractor_share_curated": 1 / 4,
            "curation/unplanted_removed": 1,  # f2
            "curation/unplanted_removed_share": 1 / 6,
        }
    )


def test_nothing_removed_leaves_the_ratios_without_a_denominator_out(tmp_path):
    truth = [{"id": "x0", "path": "x0", "kind": "distractor", "original_id": "", "original": "", "edit": ""}]
    pq.write_table(pa.Table.from_pylist(truth), tmp_path / "ground_truth.parquet")
    dedup, retrieve = write_dedup_and_retrieve(tmp_path, [], ["f0", "x0"], ["f0"], pool=2)
    scores = score_curation(tmp_path / "ground_truth.parquet", dedup, retrieve)
    assert scores == {
        "curation/pool_duplicates": 0,
        "curation/pool_duplicates_found": 0,
        "curation/self_dedup_removed": 0,
        "curation/test_copies": 0,
        "curation/test_copies_in_curated": 0,
        "curation/distractor_share_pool": 0.5,
        "curation/distractor_share_kept": 0.5,
        "curation/distractor_share_curated": 0.0,
        "curation/unplanted_removed": 0,
        "curation/unplanted_removed_share": 0.0,
    }


# An image folder as a source: crops of real photographs at different sizes, in three encodings per class.
PHOTO_CLASSES = ("astronaut", "camera", "china", "coffee")
PHOTO_SIZES = dict(
    seed_per_class=2,
    eval_train_per_class=2,
    pool_images=24,  # every readable, distinct train image left: the draw meets every train file
    eval_test_per_class=3,
    pool_duplicates=6,
    test_copies=12,  # every evaluation test image, so every encoding is copied
    distractor_digits=3,
    distractor_photos=2,
)


def write_crops(folder: Path, name: str, count: int, rng: np.random.Generator) -> list[Path]:
    """``count`` crops of the photograph ``name``, 24-56 px a side (not square), saved in turn as an RGB JPEG,
    an 8-bit grey PNG and a 16-bit grey PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    image = photo(name)
    paths = []
    for number in range(count):
        side = int(rng.integers(120, 301))
        left, top = (int(rng.integers(0, extent - side)) for extent in image.size)
        size = (int(rng.integers(24, 57)), int(rng.integers(24, 57)))
        crop = image.crop((left, top, left + side, top + side)).resize(size, Image.BILINEAR)
        if number % 3 == 0:
            paths.append(folder / f"{name}_{number}.jpg")
            crop.save(paths[-1], quality=90)
        elif number % 3 == 1:
            paths.append(folder / f"{name}_{number}.png")
            crop.convert("L").save(paths[-1])
        else:
            paths.append(folder / f"{name}_{number}.png")
            Image.fromarray(np.asarray(crop.convert("L"), dtype=np.uint16) * 257).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """<root>/{train,test}/<class>/: 10 train and 3 test crops per class, plus in train a truncated JPEG and an
    exact copy of another train file."""
    root = tmp_path_factory.mktemp("work") / "photos"
    rng = np.random.default_rng(0)
    for name in PHOTO_CLASSES:
        write_crops(root / "train" / name, name, 10, rng)
        write_crops(root / "test" / name, name, 3, rng)
    jpeg = (root / "train" / "astronaut" / "astronaut_0.jpg").read_bytes()
    (root / "train" / "astronaut" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "train" / "coffee" / "coffee_1_again.png").write_bytes(
        (root / "train" / "coffee" / "coffee_1.png").read_bytes()
    )
    return root


@pytest.fixture(scope="module")
def photo_build(photo_folder, run_dinov2) -> tuple[Path, str]:
    """`dinov2 prepare-default` run for real, with the folder named by a path relative to the working directory."""
    work = photo_folder.parent
    (work / "params.yaml").write_text(
        yaml.safe_dump({"prepare": {"default_data": {"source": "photos", **PHOTO_SIZES}}})
    )
    command = run_dinov2("prepare-default", "--out", "prepare", "--params", "params.yaml", cwd=work, timeout=300)
    output = command.stdout + command.stderr
    assert command.returncode == 0, output
    return work / "prepare", output


def test_an_image_folder_is_cut_into_the_configured_counts_with_its_skipped_files_recorded(photo_build, photo_folder):
    out, output = photo_build
    assert json.loads((out / "metrics.json").read_text()) == {
        "prepare/seed_images": 8,
        "prepare/eval_train_images": 8,
        "prepare/eval_test_images": 12,
        "prepare/pool_images": 24 + 6 + 12 + 3 + 2,
        "prepare/pool_folder_images": 24,
        "prepare/near_twins_left_out": 0,
        "prepare/planted_pool_duplicates": 6,
        "prepare/planted_test_copies": 12,
        "prepare/distractor_digits": 3,
        "prepare/distractor_photos": 2,
        **{f"prepare/{name}_unreadable": 0 for name in ("seed", "pool", "eval_train", "eval_test")},
        "prepare/source_unreadable": 1,
        "prepare/source_exact_copies": 1,
    }
    assert "47 pool images" in output
    for name in PHOTO_CLASSES:
        assert len(list((out / "seed" / name).iterdir())) == 2
        assert len(list((out / "eval" / "train" / name).iterdir())) == 2
        assert len(list((out / "eval" / "test" / name).iterdir())) == 3
    assert len(list((out / "pool" / "folder").iterdir())) == 24
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    assert [row["kind"] for row in truth] == ["pool_duplicate"] * 6 + ["test_copy"] * 12 + ["distractor"] * 5
    skipped = pq.read_table(out / "source_skipped.parquet").to_pylist()
    assert skipped[0]["path"] == str(photo_folder / "train" / "astronaut" / "truncated.jpg")
    assert skipped[0]["reason"].startswith("OSError: ") and "truncated" in skipped[0]["reason"].lower()
    copies = {str(photo_folder / "train" / "coffee" / name) for name in ("coffee_1.png", "coffee_1_again.png")}
    assert {skipped[1]["path"], skipped[1]["reason"].removeprefix("exact copy of ")} == copies


def test_an_image_folder_s_files_are_copied_byte_for_byte_under_their_class_and_split(photo_build, photo_folder):
    out, _ = photo_build
    where = {}  # bytes -> (split, class) of the folder's files
    for path in photo_folder.rglob("*.*"):
        where.setdefault(path.read_bytes(), (path.parent.parent.name, path.parent.name))
    for folder, split in (("seed", "train"), ("eval/train", "train"), ("eval/test", "test")):
        for path in (out / folder).rglob("*.*"):
            assert where[path.read_bytes()] == (split, path.parent.name)
            assert path.name.startswith(f"{split}_")
    pool = [path.read_bytes() for path in (out / "pool" / "folder").iterdir()]
    assert all(where[data][0] == "train" for data in pool)
    labelled = [path.read_bytes() for path in [*(out / "seed").rglob("*.*"), *(out / "eval").rglob("*.*")]]
    assert len(set(pool + labelled)) == 24 + 8 + 8 + 12
    assert {row["label"] for row in manifest(out, "seed")} == set(PHOTO_CLASSES)
    assert {row["source"] for row in manifest(out, "eval_test")} == {"folder_eval_test"}


def test_every_planted_copy_of_a_folder_image_keeps_its_size_and_its_edits_reproduce_it(photo_build, tmp_path):
    out, _ = photo_build
    truth = pq.read_table(out / "ground_truth.parquet").to_pylist()
    pool = {row["id"]: row for row in manifest(out, "pool")}
    eval_test = {row["id"]: row for row in manifest(out, "eval_test")}
    own_sides = [min(Image.open(path).size) for path in (out / "pool" / "folder").iterdir()]
    side = round(float(np.median(own_sides)))
    assert 24 <= side <= 56
    for row in truth:
        planted = pool[row["id"]]
        assert (planted["path"], planted["split"], planted["label"]) == (str(out.resolve() / row["path"]), "pool", "")
        if row["kind"] == "distractor":
            assert (planted["width"], planted["height"]) == (side, side)
            assert row["edit"] == f"resize:{side}"
            continue
        original = (pool if row["kind"] == "pool_duplicate" else eval_test)[row["original_id"]]
        assert original["path"] == str(out.resolve() / row["original"])
        assert (planted["width"], planted["height"]) == (original["width"], original["height"])
        # The copy is made from the original as read_rgb reads it (16-bit grey scaled, not clipped to white).
        again = write_copy(read_rgb(out / row["original"]), parse_edits(row["edit"]), tmp_path / "again")
        assert again.read_bytes() == (out / row["path"]).read_bytes()
        again.unlink()
    copied = {row["original"] for row in truth if row["kind"] == "test_copy"}
    assert copied == {f"eval/test/{row['label']}/{Path(row['path']).name}" for row in eval_test.values()}


def test_an_image_folder_build_is_the_same_bytes_in_process_and_from_the_command(photo_build, photo_folder, tmp_path):
    out, _ = photo_build
    again = tmp_path / "again"
    build_default_data(again, DefaultData(source=str(photo_folder), **PHOTO_SIZES))
    images = {name: data for name, data in files_under(out).items() if not name.startswith("manifests/")}
    assert images == {name: data for name, data in files_under(again).items() if not name.startswith("manifests/")}


FOLDER = {"train/cat": 6, "train/dog": 6, "test/cat": 3, "test/dog": 3}
FOLDER_SIZES = dict(
    seed_per_class=2,
    eval_train_per_class=2,
    pool_images=4,
    eval_test_per_class=3,
    pool_duplicates=2,
    test_copies=6,
    distractor_digits=0,
    distractor_photos=0,
)


@pytest.mark.parametrize(
    "folder, sizes, message",
    [
        (None, {}, "prepare.default_data.source: image folder not found: {root}"),
        ("a file", {}, "prepare.default_data.source: {root} is a file, not an image folder"),
        (
            {"train/cat": 6},
            {},
            "prepare.default_data.source: {root} has no test/ folder; expected {root}/train/<class>/ and "
            "{root}/test/<class>/",
        ),
        (
            {"train": 6, "test/cat": 3},
            {},
            "prepare.default_data.source: {root}/train holds no class folders; "
            "expected {root}/train/<class>/<image files>",
        ),
        (
            {"train/cat": 6, "train/dog": 6, "test/cat": 3, "test/eel": 3},
            {},
            "prepare.default_data.source: the class folders of {root}/train and {root}/test differ: "
            "only in train: dog; only in test: eel",
        ),
        (
            {**FOLDER, "train/dog": 3},
            {},
            "prepare.default_data: 1 of 2 classes hold fewer than seed_per_class + eval_train_per_class = 4 images in "
            "{root}/train: 'dog' 3",
        ),
        (
            {**FOLDER, "test/dog": 2},
            {},
            "prepare.default_data: 1 of 2 classes hold fewer than eval_test_per_class = 3 images in {root}/test: "
            "'dog' 2",
        ),
        (
            FOLDER,
            {"pool_images": 5},
            "prepare.default_data: pool_images = 5 exceeds the 4 images of {root}/train left after seed_per_class + "
            "eval_train_per_class",
        ),
        (
            FOLDER,
            {"test_copies": 7},
            "prepare.default_data: test_copies = 7 exceeds the 6 evaluation test images (2 classes x "
            "eval_test_per_class = 3)",
        ),
    ],
    ids=[
        "missing",
        "a-file",
        "no-test-split",
        "no-class-folders",
        "classes-differ",
        "too-few-train",
        "too-few-test",
        "pool-larger-than-the-folder",
        "more-test-copies-than-test-images",
    ],
)
def test_a_bad_image_folder_is_a_one_line_error_before_any_output(
    folder, sizes, message, tmp_path, monkeypatch, cli_error
):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    if folder == "a file":
        root.write_bytes(b"")
    for place, count in (folder if isinstance(folder, dict) else {}).items():
        write_crops(root / place, "astronaut", count, rng)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"prepare": {"default_data": {"source": "images", **FOLDER_SIZES, **sizes}}})
    )
    out = cli_error(["prepare-default", "--out", "prepare", "--params", "params.yaml"])
    assert out == f"error: {message.format(root=root)}\n"
    assert not (tmp_path / "prepare").exists() and not (tmp_path / ".prepare.partial").exists()


def test_unreadable_files_that_leave_too_few_images_are_an_error_after_decoding_before_any_output(
    photo_folder, tmp_path, monkeypatch, cli_error
):
    """The photo folder lists 26 train files beyond seed and eval_train, but one is truncated and one an exact copy."""
    monkeypatch.chdir(tmp_path)
    sizes = {**PHOTO_SIZES, "pool_images": 25}
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"prepare": {"default_data": {"source": str(photo_folder), **sizes}}})
    )
    out = cli_error(["prepare-default", "--out", "prepare", "--params", "params.yaml"])
    assert out == (
        "error: prepare.default_data: pool_images = 25 exceeds the 24 readable, distinct train images left after "
        "seed_per_class + eval_train_per_class\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
