"""The curation stages as a user runs them: real files, real processes, a real MLflow server."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.atomic import write_table
from dinov2.copydetect.edits import WEB_COPIES, web_copy
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import embed_manifest, load_embeddings
from dinov2.curation.manifest import build_manifest
from dinov2.hub import save_backbone


def test_manifest_records_unreadable_files_and_collapses_exact_copies(tmp_path, photos):
    folder = tmp_path / "images"
    (folder / "cats").mkdir(parents=True)
    photos[2].save(folder / "cats" / "chelsea.jpg", quality=90)
    photos[0].save(folder / "astronaut.png")
    (folder / "cats" / "chelsea_again.jpg").write_bytes((folder / "cats" / "chelsea.jpg").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    built = build_manifest(folder, "web", "pool", labels_from_folders=True)
    assert built.counts() == {"files": 4, "images": 2, "unreadable": 1, "exact_duplicates": 1}
    assert built.table.column("id").to_pylist() == ["web/astronaut.png", "web/cats/chelsea.jpg"]
    assert built.table.column("label").to_pylist() == ["", "cats"]
    assert built.table.column("width").to_pylist() == [512, 451]
    assert built.unreadable.column("path").to_pylist() == [str(folder / "broken.jpg")]


def test_embed_writes_unit_fp16_shards_and_resumes_finished_ones(tmp_path, rotated_photos, tiny_vit):
    write_table(build_manifest(rotated_photos, "web", "pool").table, tmp_path / "manifest.parquet")
    checkpoint = save_backbone(tiny_vit(), tmp_path / "tiny.safetensors")
    embedder = build_embedder(str(checkpoint), crop_size=32, device="cpu")
    first = embed_manifest(tmp_path / "manifest.parquet", tmp_path / "emb", embedder, batch_size=2, shard_size=2)
    assert (first["shards"], first["shards_resumed"], first["embedded"]) == (3, 0, 5)
    shard = np.load(tmp_path / "emb" / "shards" / "vectors-00002.npy", mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (1, 64)
    loaded = load_embeddings(tmp_path / "emb")
    np.testing.assert_allclose(np.linalg.norm(loaded.vectors, axis=1), 1.0, atol=2e-3)
    assert loaded.ids == [f"web/p{i}.png" for i in range(5)]
    (tmp_path / "emb" / "shards" / "vectors-00001.npy").unlink()
    again = embed_manifest(tmp_path / "manifest.parquet", tmp_path / "emb", embedder, batch_size=2, shard_size=2)
    assert (again["shards_resumed"], again["embedded_now"]) == (2, 2)
    np.testing.assert_allclose(load_embeddings(tmp_path / "emb").vectors, loaded.vectors, atol=1e-3)


def test_bad_inputs_fail_with_a_clear_message_and_leave_no_output(tmp_path, photos, cli, cli_error, monkeypatch):
    # the commands run in this process, as their console script does (a subprocess each took seconds)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DINOV2_TRACKING", "off")  # the set-up steps' MLflow runs are not what is tested here
    (tmp_path / "empty").mkdir()
    output = cli_error(["prepare", "--images", "empty", "--source", "web", "--split", "pool", "--out", "m"])
    assert "no image files" in output and not (tmp_path / "m").exists()

    (tmp_path / "imgs").mkdir()
    for index in range(3):
        photos[index].save(tmp_path / "imgs" / f"{index}.png")
    cli(["prepare", "--images", "imgs", "--source", "web", "--split", "pool", "--out", "m"])
    (tmp_path / "imgs" / "1.png").unlink()
    output = cli_error(["embed", "--manifest", "m/manifest.parquet", "--out", "e"])
    assert "1 image file(s) listed but missing" in output and "1.png" in output
    assert not (tmp_path / "e").exists()

    photos[1].save(tmp_path / "imgs" / "1.png")
    cli(["embed", "--manifest", "m/manifest.parquet", "--out", "e"])
    other = tmp_path / "other"
    write_table(pq.read_table(tmp_path / "m" / "manifest.parquet"), tmp_path / "other.parquet")
    embedder = build_embedder("dinov2_vits14", crop_size=14, device="cpu")
    embed_manifest(tmp_path / "other.parquet", other, embedder, batch_size=4, shard_size=10)
    output = cli_error(["dedup", "--pool", "e", "--eval", "other", "--out", "d"])
    assert "384-d embeddings" in output and "expected 608-d" in output
    assert not (tmp_path / "d").exists()

    (tmp_path / "params.yaml").write_text("dedup:\n  self_threshold: 1.2\n")
    output = cli_error(["dedup", "--pool", "e", "--out", "d"])
    assert "self_threshold" in output and "[0, 1], got 1.2" in output
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".*partial"))


# Where each of the 19 photographs goes in the end-to-end test.
EVAL_PHOTOS = ("coffee", "rocket", "china", "camera", "clock")
SEED_PHOTOS = ("astronaut", "chelsea", "flower", "motorcycle")  # the wanted domain: colour photographs
POOL_PHOTOS = ("immunohistochemistry", "retina", "moon", "coins", "page", "text", "cell", "brick", "grass", "gravel")


@pytest.mark.slow
def test_a_pool_with_digit_distractors_is_curated_end_to_end(
    tmp_path, mnist_digits, thumbnails, mlflow_uri, run_dinov2
):
    """Seed: 4 photographs. Pool: 10 other photographs with 4 copies of each, 4 copies of each eval photograph,
    300 MNIST digits. Eval: 5 photographs (embedded with their views). All photographs are 64 px thumbnails."""
    photos = thumbnails
    for name, folder in [*((n, "seed") for n in SEED_PHOTOS), *((n, "eval") for n in EVAL_PHOTOS),
                         *((n, "pool/photos") for n in POOL_PHOTOS)]:  # fmt: skip
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        photos[name].save(tmp_path / folder / f"{name}.png")
    pool = tmp_path / "pool"
    (pool / "copies").mkdir()
    for name in POOL_PHOTOS + EVAL_PHOTOS:
        for edit_name in WEB_COPIES:
            web_copy(photos[name], edit_name).save(pool / "copies" / f"{name}_{edit_name}.png")
    (pool / "digits").mkdir()
    for index, digit in enumerate(mnist_digits[:300]):
        Image.fromarray(digit).convert("RGB").resize((32, 32)).save(pool / "digits" / f"{index}.png")
    # The digits are one duplicate group to the copy descriptor: dedup's guard must say so, and go on when told to.
    (tmp_path / "params.yaml").write_text(
        "dedup:\n  guards: warn\nretrieve:\n  datasets:\n    photo_seed: {mode: sample, k: 2}\n"
    )
    for name, split, folder in [
        ("web", "pool", pool),
        ("photo_seed", "seed", tmp_path / "seed"),
        ("photo_test", "eval", tmp_path / "eval"),
    ]:
        result = run_dinov2(
            "prepare", "--images", str(folder), "--source", name, "--split", split, "--out", f"m/{name}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stdout + result.stderr
        result = run_dinov2("embed", "--manifest", f"m/{name}/manifest.parquet", "--out", f"e/{name}", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    result = run_dinov2("dedup", "--pool", "e/web", "--eval", "e/photo_test", "--out", "d", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "self-dedup put 300 of 370 pool images (81.1%) in one duplicate group" in result.stdout + result.stderr
    dedup = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert dedup["dedup/pool_images"] == 10 + 60 + 300
    assert dedup["dedup/eval_vectors"] == 5 * 3  # each eval image and its two default views
    kept = pq.read_table(tmp_path / "d" / "kept.parquet").column("id").to_pylist()
    leaks = set(pq.read_table(tmp_path / "d" / "eval_leaks.parquet").column("id").to_pylist())
    survivors = {}
    for name in POOL_PHOTOS:
        group = {f"web/photos/{name}.png"} | {f"web/copies/{name}_{edit}.png" for edit in WEB_COPIES}
        survivors[name] = len(group & (set(kept) | leaks))  # what self-dedup kept
    # A photograph and its 4 copies form one component, one image survives; the 90% crops of coins and page
    # stay below the 0.825 threshold (as in test_copy_descriptor_groups_each_photo_with_its_copies_and_nothing_else).
    assert survivors == {**dict.fromkeys(POOL_PHOTOS, 1), "coins": 2, "page": 2}, survivors
    eval_copies = {f"web/copies/{name}_{edit}.png" for name in EVAL_PHOTOS for edit in WEB_COPIES}
    assert not eval_copies & set(kept)  # copies of evaluation images: all gone
    false_leaks = sorted(leaks - eval_copies)
    print(f"relative dedup: {len(leaks & eval_copies)} eval copies and {false_leaks} removed")
    assert false_leaks == []
    # Self-dedup links the 300 digits into one group: to the copy descriptor, grey strokes on black look alike.
    kept_digits = sum("/digits/" in image_id for image_id in kept)
    assert 300 / dedup["dedup/pool_images"] > 0.8 and kept_digits == 1
    assert len(kept) == 10 + 2 + 1  # the pool photographs' groups (coins and page twice) and one digit
    assert (tmp_path / "d" / "plots" / "duplicate_groups.png").is_file()

    result = run_dinov2(
        "retrieve", "--pool", "e/web", "--kept", "d/kept.parquet", "--seed", "e/photo_seed", "--out", "r", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    curated = pq.read_table(tmp_path / "r" / "curated.parquet").column("id").to_pylist()
    print(f"curated (the 2 nearest kept images of each seed): {sorted(curated)}")
    assert set(curated) <= set(kept) and len(curated) == 7  # 4 seeds x 2, one image shared by two seeds

    import mlflow

    runs = mlflow.search_runs(experiment_names=["dinov2/retrieve"], output_format="list")
    assert runs[0].data.metrics["retrieve/curated"] == len(curated)
