"""The default data set: Fashion-MNIST seed / pool / eval folders with planted copies, and how curation is scored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dinov2.curation.default_data import (
    BRIGHTNESS_FACTOR,
    CROP_KEPT,
    JPEG_QUALITY,
    ROTATION_DEGREES,
    build_default_data,
    parse_edits,
    score_curation,
    write_copy,
)
from dinov2.curation.params import DefaultData
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

SMALL = dict(
    seed_per_class=2,
    pool_images=40,
    eval_train_per_class=1,
    eval_test_per_class=2,
    pool_duplicates=6,
    test_copies=4,
    distractor_digits=3,
    distractor_photos=2,
)


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default") / "prepare"
    return out, build_default_data(out, DefaultData(**SMALL))


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / "manifests" / name / "manifest.parquet").to_pylist()


def test_every_folder_holds_the_configured_counts(small_build):
    out, metrics = small_build
    assert metrics == {
        "prepare/seed_images": 20,
        "prepare/eval_train_images": 10,
        "prepare/eval_test_images": 20,
        "prepare/pool_images": 40 + 6 + 4 + 3 + 2,
        "prepare/pool_fashion_images": 40,
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


def test_seed_pool_and_eval_are_disjoint_fashion_mnist_images_with_their_labels(small_build):
    out, _ = small_build
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


def test_the_ground_truth_names_real_files_and_its_edits_reproduce_every_copy(small_build, tmp_path):
    out, _ = small_build
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
        for edit in edits:
            low, high = {
                "crop": CROP_KEPT,
                "rotate": (-ROTATION_DEGREES, ROTATION_DEGREES),
                "brightness": BRIGHTNESS_FACTOR,
                "jpeg": JPEG_QUALITY,
            }.get(edit.kind, (None, None))
            assert edit.kind == "flip" or low <= edit.strength <= high
        assert Path(row["path"]).suffix == (".jpg" if any(edit.kind == "jpeg" for edit in edits) else ".png")
        # Applying the recorded edits to the original writes the planted file byte for byte.
        again = write_copy(Image.open(out / row["original"]), edits, tmp_path / "again")
        assert again.read_bytes() == (out / row["path"]).read_bytes()
        again.unlink()
    sources = [row["original"].partition(":")[0] for row in truth if row["kind"] == "distractor"]
    assert sources[:3] == ["mnist"] * 3 and len(sources) == 5 and set(sources[3:]) <= {"skimage", "sklearn"}


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(small_build, tmp_path):
    out, _ = small_build
    again = tmp_path / "again"
    build_default_data(again, DefaultData(**SMALL))
    images = {name: data for name, data in files_under(out).items() if not name.startswith("manifests/")}
    assert images == {name: data for name, data in files_under(again).items() if not name.startswith("manifests/")}
    for name in ("seed", "pool", "eval_train", "eval_test"):
        first, second = manifest(out, name), manifest(again, name)
        assert [row["content_hash"] for row in first] == [row["content_hash"] for row in second]
    other = tmp_path / "other"
    build_default_data(other, DefaultData(**{**SMALL, "seed": 1}))
    assert files_under(other / "seed") != files_under(out / "seed")
    assert files_under(other / "pool" / "planted") != files_under(out / "pool" / "planted")


def dinov2(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dinov2", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_a_killed_build_leaves_the_previous_folder_untouched_and_the_next_build_completes(tmp_path):
    build_default_data(tmp_path / "prepare", DefaultData(**SMALL))
    before = files_under(tmp_path / "prepare")
    large = tmp_path / "large.yaml"
    large.write_text(yaml.safe_dump({"prepare": {"default_data": {**SMALL, "seed": 1, "pool_images": 20_000}}}))
    killed = dinov2("prepare-default", "--out", "prepare", "--params", str(large), cwd=tmp_path)
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
    small.write_text(yaml.safe_dump({"prepare": {"default_data": SMALL}}))
    again = dinov2("prepare-default", "--out", "prepare", "--params", str(small), cwd=tmp_path)
    output = again.communicate(timeout=300)[0]
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
