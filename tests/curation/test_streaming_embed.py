"""`embed` streams images through a DataLoader: bounded memory, a pixel limit, every skipped file recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.configuration.curation import EmbedParams, PrepareParams
from dinov2.curation.embed import embed as run_embed
from dinov2.curation.embeddings import load_embeddings
from dinov2.curation.manifest import prepare as run_prepare
from dinov2.data.images import read_rgb

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh process: import everything, reset the peak RSS (Linux /proc/self/clear_refs "5"), embed
# with decoding in this same process (num_workers 0), print how far the peak rose above the RSS after import.
MEASURE_EMBED = """
import json, sys
from pathlib import Path
from dinov2.curation.embed import embed as run_embed
from dinov2.curation.manifest import prepare as run_prepare
from dinov2.configuration.curation import EmbedParams

def status_mib(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) // 1024

manifest, out, shard_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
after_import = status_mib("VmRSS")
params = EmbedParams(shard_size=shard_size, batch_size=2, num_workers=0, device="cpu")
metrics = run_embed(manifest, out, params)
print(json.dumps({"rise_mib": status_mib("VmHWM") - after_import, "embedded": metrics["embed/embedded"]}))
"""


@pytest.fixture(scope="module")
def large_photos(tmp_path_factory, photos) -> Path:
    """12 JPEGs of 4000 x 3000 (12 megapixels, 36 MB each once decoded): real photos upscaled."""
    folder = tmp_path_factory.mktemp("large") / "images"
    folder.mkdir()
    for index in range(12):
        photo = photos[index % 4].rotate(index * 7)
        photo.resize((4000, 3000), Image.BILINEAR).save(folder / f"photo_{index:02d}.jpg", quality=85)
    return folder


def embed_rise_mib(manifest: Path, out: Path, shard_size: int) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_EMBED, str(manifest), str(out), str(shard_size)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_embedding_memory_stays_bounded_and_does_not_grow_with_the_shard_size(tmp_path, large_photos):
    run_prepare(large_photos, "large", "pool", tmp_path / "manifest", PrepareParams())
    manifest = tmp_path / "manifest" / "manifest.parquet"
    one_shard = embed_rise_mib(manifest, tmp_path / "one_shard", shard_size=12)
    twelve_shards = embed_rise_mib(manifest, tmp_path / "twelve_shards", shard_size=1)
    print(f"peak RSS rise while embedding: {one_shard} (shard_size 12), {twelve_shards} (shard_size 1)")
    assert one_shard["embedded"] == twelve_shards["embedded"] == 12
    # All 12 photos decoded at once would hold 12 x 36 MB = 432 MB (measured 664 MB when a shard was decoded
    # whole); streamed two at a time it measured about 60 MB.
    assert one_shard["rise_mib"] < 200 and twelve_shards["rise_mib"] < 200
    assert abs(one_shard["rise_mib"] - twelve_shards["rise_mib"]) < 50
    np.testing.assert_array_equal(
        load_embeddings(tmp_path / "one_shard").vectors, load_embeddings(tmp_path / "twelve_shards").vectors
    )


def test_a_jpeg_over_the_pixel_limit_is_decoded_small_and_a_png_over_it_is_skipped(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    large = photos[0].resize((2000, 1500), Image.BILINEAR)
    large.save(folder / "large.jpg", quality=90)
    large.save(folder / "large.png")
    photos[1].save(folder / "small.png")
    # 3 megapixels over a 1-megapixel limit: the JPEG decoder scales by 1/2 while decoding (0.75 megapixels).
    assert read_rgb(folder / "large.jpg", max_pixels=1_000_000).size == (1000, 750)
    assert read_rgb(folder / "large.jpg").size == (2000, 1500)
    run_prepare(folder, "web", "pool", tmp_path / "manifest", PrepareParams())
    manifest = pq.read_table(tmp_path / "manifest" / "manifest.parquet")
    assert manifest.column("width").to_pylist() == [2000, 2000, 600]  # the files' own sizes, from their headers
    params = EmbedParams(max_pixels=1_000_000, num_workers=0, device="cpu")
    metrics = run_embed(tmp_path / "manifest" / "manifest.parquet", tmp_path / "emb", params)
    assert (metrics["embed/embedded"], metrics["embed/unreadable"]) == (2, 1)
    assert load_embeddings(tmp_path / "emb").ids == ["web/large.jpg", "web/small.png"]
    skipped = pq.read_table(tmp_path / "emb" / "unreadable.parquet").to_pylist()
    assert [row["path"] for row in skipped] == [str(folder / "large.png")]
    assert skipped[0]["reason"] == (
        "ImageTooLarge: 2000x1500 is 3.0 megapixels, over the limit of 1 (max_pixels), "
        "and PNG cannot be decoded at a reduced size"
    )


def test_workers_embed_the_same_vectors_in_manifest_order_and_record_a_file_gone_bad(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        photos[index % 4].rotate(index * 9).resize((120, 90)).save(folder / f"p{index}.jpg", quality=90)
    run_prepare(folder, "web", "pool", tmp_path / "manifest", PrepareParams())
    manifest = tmp_path / "manifest" / "manifest.parquet"
    (folder / "p2.jpg").write_bytes((folder / "p2.jpg").read_bytes()[:200])  # truncated after prepare
    in_process = run_embed(manifest, tmp_path / "w0", EmbedParams(num_workers=0, shard_size=2, batch_size=1))
    in_workers = run_embed(manifest, tmp_path / "w2", EmbedParams(num_workers=2, shard_size=2, batch_size=2))
    assert in_process["embed/embedded"] == in_workers["embed/embedded"] == 4
    expected_ids = [f"web/p{index}.jpg" for index in (0, 1, 3, 4)]
    assert load_embeddings(tmp_path / "w2").ids == expected_ids
    np.testing.assert_array_equal(load_embeddings(tmp_path / "w0").vectors, load_embeddings(tmp_path / "w2").vectors)
    for out in ("w0", "w2"):
        skipped = pq.read_table(tmp_path / out / "unreadable.parquet").to_pylist()
        assert [row["path"] for row in skipped] == [str(folder / "p2.jpg")]
        assert skipped[0]["reason"] == "OSError: Truncated File Read"


def test_prepare_counts_and_records_symlink_loops_instead_of_dropping_them(tmp_path, photos):
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    photos[0].save(folder / "astronaut.png")
    photos[2].save(folder / "cats" / "chelsea.png")
    (tmp_path / "elsewhere").mkdir()
    photos[3].save(tmp_path / "elsewhere" / "rocket.png")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")  # a symlinked folder: followed
    (folder / "loop.jpg").symlink_to("loop.jpg")  # points at itself
    (folder / "cats" / "up").symlink_to("..")  # leads back to an ancestor
    (folder / "gone.png").symlink_to("deleted.png")
    metrics = run_prepare(folder, "web", "pool", tmp_path / "manifest", PrepareParams())
    assert metrics == {
        "prepare/files": 6,
        "prepare/images": 3,
        "prepare/unreadable": 3,
        "prepare/exact_duplicates": 0,
    }
    ids = pq.read_table(tmp_path / "manifest" / "manifest.parquet").column("id").to_pylist()
    assert ids == ["web/astronaut.png", "web/cats/chelsea.png", "web/linked/rocket.png"]
    unreadable = {
        row["path"]: row["reason"] for row in pq.read_table(tmp_path / "manifest" / "unreadable.parquet").to_pylist()
    }
    assert unreadable == {
        str(folder / "cats" / "up"): f"symlink loop: leads back to {folder}, listed once",
        str(folder / "gone.png"): f"broken symlink: {folder / 'gone.png'} -> deleted.png does not exist",
        str(folder / "loop.jpg"): f"symlink loop: {folder / 'loop.jpg'} -> loop.jpg never reaches a file",
    }
