"""Self-dedup keeps the best copy of a duplicate group (most pixels, then largest file), whatever the paths."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.configuration.curation import DedupParams, EmbedParams, PrepareParams
from dinov2.curation.dedup import dedup
from dinov2.curation.embed import embed as run_embed
from dinov2.curation.manifest import prepare as run_prepare
from dinov2.curation.representatives import kept_reason, preference_order


def test_images_are_ranked_by_pixels_then_lossless_storage_then_lossy_file_size_then_path():
    pixels = np.array([100, 400, 400, 400, 400, 400, 50])
    size_bytes = np.array([900, 300, 500, 500, 200, 100, 10])
    paths = ["g.jpg", "f.jpg", "e.jpg", "d.jpg", "c.png", "b.png", "a.png"]
    # Best first: the 400-pixel PNGs b and c (sizes of lossless files are not compared: path order), then the
    # 400-pixel JPEGs by size, d before e (same size, path order), then f; then g (100 px) and a (50 px).
    rank = preference_order(pixels, size_bytes, paths)
    assert rank.tolist() == [5, 4, 3, 2, 1, 0, 6]
    assert kept_reason(np.array([0, 1]), rank, pixels, size_bytes, paths) == "most_pixels"
    assert kept_reason(np.array([1, 4]), rank, pixels, size_bytes, paths) == "lossless_file"
    assert kept_reason(np.array([1, 2]), rank, pixels, size_bytes, paths) == "largest_file"
    assert kept_reason(np.array([2, 3]), rank, pixels, size_bytes, paths) == "first_path"
    assert kept_reason(np.array([4, 5]), rank, pixels, size_bytes, paths) == "first_path"


def run_dedup(folder, tmp_path):
    run_prepare(folder, "web", "pool", tmp_path / "manifest", PrepareParams())
    run_embed(tmp_path / "manifest" / "manifest.parquet", tmp_path / "emb", EmbedParams(device="cpu"))
    metrics = dedup(tmp_path / "emb", [], tmp_path / "dedup", DedupParams())
    return metrics, pq.read_table(tmp_path / "dedup" / "duplicate_groups.parquet").to_pylist()


@pytest.mark.parametrize(("original", "copy"), [("a_original.jpg", "b_copy.jpg"), ("b_original.jpg", "a_copy.jpg")])
def test_the_full_quality_original_is_kept_over_a_degraded_copy_in_either_path_order(tmp_path, photos, original, copy):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, photo in enumerate(photos[:2] + photos[3:]):
        photo.save(folder / f"other_{index}.png")
    cat = photos[2]  # chelsea, 451 x 300
    cat.save(folder / original, quality=95)
    cat.resize((225, 150), Image.BICUBIC).save(folder / copy, quality=30)
    metrics, rows = run_dedup(folder, tmp_path)
    assert [(row["id"], row["kept"], row["pixels"], row["kept_reason"]) for row in rows] == [
        (f"web/{original}", True, 451 * 300, "most_pixels"),
        (f"web/{copy}", False, 225 * 150, "most_pixels"),
    ]
    assert all(row["representative"] == f"web/{original}" for row in rows)
    kept = pq.read_table(tmp_path / "dedup" / "kept.parquet").column("id").to_pylist()
    assert f"web/{original}" in kept and f"web/{copy}" not in kept
    assert (metrics["dedup/kept_most_pixels"], metrics["dedup/duplicate_groups"]) == (1, 1)


def test_between_copies_of_the_same_size_the_least_compressed_file_is_kept(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, photo in enumerate(photos[:2]):
        photo.save(folder / f"other_{index}.png")
    photos[2].save(folder / "a_recompressed.jpg", quality=20)
    photos[2].save(folder / "b_fine.jpg", quality=95)
    _, rows = run_dedup(folder, tmp_path)
    sizes = {row["id"]: row["size_bytes"] for row in rows}
    assert sizes["web/b_fine.jpg"] > sizes["web/a_recompressed.jpg"]
    assert [(row["id"], row["kept"], row["kept_reason"]) for row in rows] == [
        ("web/b_fine.jpg", True, "largest_file"),
        ("web/a_recompressed.jpg", False, "largest_file"),
    ]


def test_a_lossless_original_is_kept_over_a_larger_jpeg_re_encoding_of_the_same_size(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, photo in enumerate(photos[:2]):
        photo.save(folder / f"other_{index}.png")
    small = photos[2].convert("L").resize((28, 28), Image.BICUBIC)  # a thumbnail, as in a crawled pool
    small.save(folder / "b_original.png")
    small.save(folder / "a_copy.jpg", quality=95)
    _, rows = run_dedup(folder, tmp_path)
    sizes = {row["id"]: row["size_bytes"] for row in rows}
    assert sizes["web/a_copy.jpg"] > sizes["web/b_original.png"]  # the JPEG is the larger file
    assert [(row["id"], row["kept"], row["kept_reason"]) for row in rows] == [
        ("web/b_original.png", True, "lossless_file"),
        ("web/a_copy.jpg", False, "lossless_file"),
    ]
