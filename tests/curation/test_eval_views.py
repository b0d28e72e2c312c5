"""Extra views of evaluation images: the crops by hand, their parsing, and how embed stores and resumes them."""

import json

import numpy as np
import pytest
from PIL import Image

from dinov2.atomic import write_table
from dinov2.configuration import ConfigError
from dinov2.configuration.curation import EmbedParams
from dinov2.configuration.params import load_section
from dinov2.copydetect.copy_descriptor import COPY_DESCRIPTOR_DIM, copy_descriptor
from dinov2.curation.embed import embed
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import EmbeddingError, embed_manifest, load_embeddings
from dinov2.curation.manifest import build_manifest
from dinov2.curation.views import expand, parse_views, views_per_image


def numbered_image(width: int = 4, height: int = 4) -> Image.Image:
    """Grey image whose pixel (x, y) holds 10 * y + x, so every crop can be read off by hand."""
    values = 10 * np.arange(height)[:, None] + np.arange(width)[None, :]
    return Image.fromarray(values.astype(np.uint8), mode="L")


def pixels(image: Image.Image) -> list[list[int]]:
    return np.asarray(image).tolist()


def test_views_cut_the_crops_drawn_by_hand():
    image = numbered_image()
    centre, *corners, mirrored = expand(image, parse_views(["centre_crop:0.5", "corner_crops:0.5", "mirror"]))
    assert pixels(centre) == [[11, 12], [21, 22]]
    assert [pixels(corner) for corner in corners] == [
        [[0, 1], [10, 11]],
        [[2, 3], [12, 13]],
        [[20, 21], [30, 31]],
        [[22, 23], [32, 33]],
    ]
    assert pixels(mirrored)[0] == [3, 2, 1, 0]
    # 0.8 of 5 pixels is 4, centred on an odd side: offset (5 - 4) // 2 = 0.
    assert pixels(expand(numbered_image(5, 5), parse_views(["centre_crop:0.8"]))[0])[0] == [0, 1, 2, 3]
    assert views_per_image(parse_views(["centre_crop:0.9", "corner_crops:0.8", "mirror"])) == 6


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["zoom:0.5"], "unknown view 'zoom:0.5'"),
        (["centre_crop:1.0"], "strictly between 0 and 1"),
        (["corner_crops:half"], "expected corner_crops:F with a fraction F"),
        (["mirror:0.5"], "mirror takes no fraction"),
        (["centre_crop:0.9", "centre_crop:0.90"], "name the same view twice"),
    ],
)
def test_bad_view_names_are_refused(specs, message):
    with pytest.raises(ValueError, match=message):
        parse_views(specs)


def test_a_bad_view_in_params_yaml_names_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("embed:\n  eval_views: [centre_crop:0.9, centre_crop:2]\n")
    with pytest.raises(ConfigError, match=r"eval_views.*strictly between 0 and 1"):
        load_section(tmp_path / "params.yaml", "embed", EmbedParams)


@pytest.fixture
def photo_manifests(tmp_path, rotated_photos):
    """The same five real photos (``rotated_photos``) as an eval manifest and as a pool manifest, in tmp_path."""
    for split in ("eval", "pool"):
        write_table(build_manifest(rotated_photos, "photos", split).table, tmp_path / f"{split}.parquet")
    return tmp_path


def test_embed_stores_the_views_of_each_image_and_resumes_only_with_the_same_views(photo_manifests, rotated_photos):
    root, embedder = photo_manifests, build_embedder("copy_descriptor")
    views = ["centre_crop:0.8", "corner_crops:0.7"]
    first = embed_manifest(root / "eval.parquet", root / "emb", embedder, batch_size=2, shard_size=2, views=views)
    assert (first["shards"], first["embedded"]) == (3, 5)
    assert np.load(root / "emb" / "shards" / "views-00002.npy").shape == (1, 5, COPY_DESCRIPTOR_DIM)
    loaded = load_embeddings(root / "emb")
    assert loaded.view_names == tuple(views) and loaded.views.shape == (5, 5, COPY_DESCRIPTOR_DIM)
    # Row 3 is p3.png: photo 3 rotated by 21 degrees; its views are the descriptors of its crops.
    image = Image.open(rotated_photos / "p3.png").convert("RGB")
    expected = np.stack([copy_descriptor(crop) for crop in expand(image, parse_views(views))])
    np.testing.assert_allclose(loaded.views[3], expected, atol=2e-3)
    assert loaded.with_views().shape == (5 + 25, COPY_DESCRIPTOR_DIM)

    (root / "emb" / "shards" / "views-00001.npy").unlink()
    again = embed_manifest(root / "eval.parquet", root / "emb", embedder, batch_size=2, shard_size=2, views=views)
    assert (again["shards_resumed"], again["embedded_now"]) == (2, 2)
    other = embed_manifest(root / "eval.parquet", root / "emb", embedder, batch_size=2, shard_size=2, views=["mirror"])
    assert (other["shards_resumed"], other["embedded_now"]) == (0, 5)
    assert load_embeddings(root / "emb").views.shape == (5, 1, COPY_DESCRIPTOR_DIM)

    (root / "emb" / "shards" / "views-00000.npy").unlink()
    with pytest.raises(EmbeddingError, match="the views of shard 0 are missing"):
        load_embeddings(root / "emb")


def test_the_embed_stage_gives_views_to_evaluation_manifests_only(photo_manifests):
    root = photo_manifests
    params = EmbedParams(eval_views=["centre_crop:0.9"], shard_size=10)
    embed(root / "eval.parquet", root / "eval_emb", params)
    embed(root / "pool.parquet", root / "pool_emb", params)
    assert json.loads((root / "eval_emb" / "embeddings.json").read_text())["views"] == ["centre_crop:0.9"]
    assert json.loads((root / "pool_emb" / "embeddings.json").read_text())["views"] == []
    assert load_embeddings(root / "eval_emb").views.shape == (5, 1, COPY_DESCRIPTOR_DIM)
    assert load_embeddings(root / "pool_emb").views is None
