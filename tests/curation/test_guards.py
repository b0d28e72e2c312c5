"""The curation stages refuse (or warn about) results that are almost certainly wrong, naming the numbers."""

import json
import logging

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.configuration.curation import DedupParams, EmbedParams, PrepareParams, RetrieveParams
from dinov2.curation.dedup import CurationGuardError
from dinov2.curation.dedup import dedup as run_dedup
from dinov2.curation.embed import embed as run_embed
from dinov2.curation.embedders import PAPER_THRESHOLDS_MODEL
from dinov2.curation.embeddings import EmbeddingError, load_embeddings
from dinov2.curation.manifest import prepare as run_prepare
from dinov2.curation.retrieval import retrieve as run_retrieve
from dinov2.hub import save_backbone


def embedded(folder, tmp_path, name: str, split: str = "pool", **embed_options):
    """prepare + embed a folder as source ``name``; returns the embedding folder."""
    run_prepare(folder, name, split, tmp_path / "manifests" / name, PrepareParams())
    out = tmp_path / "embeddings" / name
    params = EmbedParams(num_workers=0, device="cpu", **embed_options)
    run_embed(tmp_path / "manifests" / name / "manifest.parquet", out, params)
    return out


@pytest.fixture(scope="module")
def digit_pool(tmp_path_factory, photos, mnist_digits):
    """40 MNIST digits and the 4 photos: the copy descriptor sees every digit as a copy of every other."""
    root = tmp_path_factory.mktemp("digit_pool")
    folder = root / "pool"
    folder.mkdir()
    for index in range(40):
        Image.fromarray(mnist_digits[index]).save(folder / f"digit_{index:02d}.png")
    for index, photo in enumerate(photos):
        photo.save(folder / f"photo_{index}.png")
    return embedded(folder, root, "web")


def test_a_duplicate_group_swallowing_the_pool_stops_dedup_with_the_numbers(tmp_path, digit_pool, run_dinov2):
    result = run_dinov2("dedup", "--pool", str(digit_pool), "--out", "dedup", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stdout.split())
    assert message.startswith(
        "error: self-dedup put 40 of 44 pool images (90.9%) in one duplicate group, more than "
        "dedup.max_group_share = 0.05 of the pool: at the threshold 0.825 the embeddings of copy_descriptor "
        "do not tell these images apart"
    ), message
    assert "dedup.guards: warn" in message
    assert not (tmp_path / "dedup").exists() and not list(tmp_path.glob(".dedup*"))


def test_the_group_guard_only_warns_when_asked_and_follows_max_group_share(tmp_path, digit_pool, caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2.curation.dedup"):
        metrics = run_dedup(digit_pool, [], tmp_path / "warned", DedupParams(guards="warn"))
    assert (metrics["dedup/largest_group"], metrics["dedup/kept"]) == (40, 5)
    assert metrics["dedup/largest_group_share"] == pytest.approx(40 / 44)
    assert "self-dedup put 40 of 44 pool images (90.9%)" in caplog.text
    assert (tmp_path / "warned" / "kept.parquet").is_file()
    # A share above 40 / 44 lets the same group through without a word.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.curation.dedup"):
        run_dedup(digit_pool, [], tmp_path / "allowed", DedupParams(max_group_share=0.95))
    assert caplog.text == ""


def test_a_backbone_with_the_papers_sscd_thresholds_is_refused_and_explicit_ones_warn(
    tmp_path, rotated_photos, tiny_vit, caplog
):
    checkpoint = save_backbone(tiny_vit(), tmp_path / "tiny.safetensors")
    pool = embedded(rotated_photos, tmp_path, "web", model=str(checkpoint), crop_size=32)
    meta = json.loads((pool / "embeddings.json").read_text())
    assert (meta["embedder"], meta["thresholds"], meta["thresholds_calibrated_for"]) == (
        "tiny.safetensors",
        {"self": 0.6, "relative": 0.45},
        PAPER_THRESHOLDS_MODEL,
    )
    with pytest.raises(CurationGuardError) as refused:
        run_dedup(pool, [], tmp_path / "dedup", DedupParams())
    assert str(refused.value).startswith(
        f"the self-dedup threshold 0.6 was calibrated for {PAPER_THRESHOLDS_MODEL}, not for tiny.safetensors"
    )
    assert not (tmp_path / "dedup").exists()

    with caplog.at_level(logging.WARNING, logger="dinov2.curation.dedup"):
        metrics = run_dedup(pool, [], tmp_path / "dedup", DedupParams(guards="warn"))
    assert metrics["dedup/self_threshold"] == 0.6
    assert f"the self-dedup threshold 0.6 was calibrated for {PAPER_THRESHOLDS_MODEL}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.curation.dedup"):
        metrics = run_dedup(pool, [], tmp_path / "dedup", DedupParams(self_threshold=0.99))
    assert metrics["dedup/self_threshold"] == 0.99
    assert "dedup.self_threshold = 0.99: no threshold is calibrated for tiny.safetensors" in caplog.text

    calibrated = embedded(
        rotated_photos,
        tmp_path,
        "calibrated",
        model=str(checkpoint),
        crop_size=32,
        calibrated_thresholds={"self": 0.99, "relative": 0.98},
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov2.curation.dedup"):
        metrics = run_dedup(calibrated, [], tmp_path / "calibrated_dedup", DedupParams())
    assert metrics["dedup/self_threshold"] == 0.99 and caplog.text == ""


def test_sets_embedded_by_different_models_of_the_same_dimension_are_not_compared(tmp_path, rotated_photos, tiny_vit):
    first = save_backbone(tiny_vit(), tmp_path / "first.safetensors")
    second = save_backbone(tiny_vit(init_values=1e-4), tmp_path / "second.safetensors")
    pool = embedded(rotated_photos, tmp_path, "web", model=str(first), crop_size=32)
    seed = embedded(rotated_photos, tmp_path, "seed", split="seed", model=str(second), crop_size=32)
    evaluation = embedded(rotated_photos, tmp_path, "test", split="eval", model=str(second), crop_size=32)
    pool_set, seed_set = load_embeddings(pool), load_embeddings(seed)
    assert pool_set.dim == seed_set.dim == 64 and pool_set.fingerprint != seed_set.fingerprint
    expected = (
        f"{seed} holds 64-d embeddings of second.safetensors ({seed_set.fingerprint}) and {pool} 64-d embeddings "
        f"of first.safetensors ({pool_set.fingerprint}): embed every set with the same model"
    )
    params = RetrieveParams(n_clusters=2)
    with pytest.raises(EmbeddingError) as refused:
        run_retrieve(pool, tmp_path / "unused.parquet", [seed], tmp_path / "retrieve", params)
    assert str(refused.value) == expected
    with pytest.raises(EmbeddingError, match="second.safetensors .* first.safetensors"):
        run_dedup(pool, [evaluation], tmp_path / "dedup", DedupParams(self_threshold=0.99))
    assert not (tmp_path / "retrieve").exists() and not (tmp_path / "dedup").exists()


@pytest.fixture
def copies_pool(tmp_path, photos):
    """Pool: 4 photos and a half-size copy of each (kept by dedup: 8 distinct images, no group over 2).
    Seed sets: ``same`` = 5 rotations of the astronaut; ``varied`` = the 4 photos at another size."""
    pool_folder, same, varied = tmp_path / "pool", tmp_path / "same", tmp_path / "varied"
    for folder in (pool_folder, same, varied):
        folder.mkdir()
    for index, photo in enumerate(photos):
        photo.save(pool_folder / f"photo_{index}.png")
        photo.resize((photo.width // 2, photo.height // 2)).save(pool_folder / f"small_{index}.png")
        photo.resize((100, 80)).save(varied / f"v{index}.png")
    for angle in range(5):
        photos[0].rotate(angle).save(same / f"astronaut_{angle}.png")
    pool = embedded(pool_folder, tmp_path, "web")
    kept = tmp_path / "manifests" / "web" / "manifest.parquet"
    return pool, kept, embedded(same, tmp_path, "same", "seed"), embedded(varied, tmp_path, "varied", "seed")


def test_retrieve_reports_how_many_distinct_images_it_got_and_warns_when_seeds_collapse(tmp_path, copies_pool, caplog):
    pool, kept, same, varied = copies_pool
    with caplog.at_level(logging.WARNING, logger="dinov2.curation.retrieval"):
        metrics = run_retrieve(pool, kept, [same, varied], tmp_path / "retrieve", RetrieveParams())
    # 5 near-identical seeds x k=4 ask for 20 images and get the same 4: the astronaut, its copy, 2 more.
    assert (metrics["retrieve/same/requested"], metrics["retrieve/same/distinct"]) == (20, 4)
    assert metrics["retrieve/same/distinct_share"] == 0.2
    # 4 different photos x k=4 ask for 16 images; the pool holds 8, all of them retrieved.
    assert (metrics["retrieve/varied/requested"], metrics["retrieve/varied/distinct"]) == (16, 8)
    assert json.loads((tmp_path / "retrieve" / "metrics.json").read_text())["retrieve/same/distinct_share"] == 0.2
    assert "seed set same: 5 seed images x k=4 asked for 20 pool images and got 4 distinct (20.0%)" in caplog.text
    assert "seed set varied" not in caplog.text


def test_a_retrieval_setting_for_a_seed_set_that_was_not_given_is_an_error_naming_it(tmp_path, copies_pool):
    pool, kept, same, varied = copies_pool
    params = RetrieveParams(datasets={"imagenet": {"mode": "sample", "k": 32}, "same": {"mode": "sample", "k": 2}})
    with pytest.raises(ValueError) as refused:
        run_retrieve(pool, kept, [same, varied], tmp_path / "retrieve", params)
    assert str(refused.value) == (
        "retrieve.datasets names imagenet, but no --seed folder holds that source (given: same, varied)"
    )
    assert not (tmp_path / "retrieve").exists()
    params = RetrieveParams(datasets={"same": {"mode": "sample", "k": 2}})
    curated = run_retrieve(pool, kept, [same], tmp_path / "retrieve", params)
    assert curated["retrieve/same/requested"] == 10
    assert pq.read_table(tmp_path / "retrieve" / "curated.parquet").num_rows == curated["retrieve/curated"]
