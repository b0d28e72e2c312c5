"""Retrieval embeds with its own embedder (``retrieve.embedder``), not with dedup's copy detector."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dinov2.cli import run
from dinov2.configuration.curation import PrepareParams, RetrieveParams
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import EmbeddingError
from dinov2.curation.manifest import prepare as run_prepare
from dinov2.curation.retrieval import retrieve as run_retrieve


def test_raw_pixels_are_the_image_resized_mean_centred_and_of_unit_norm():
    embedder = build_embedder("raw_pixels", crop_size=2)
    # a grey 2 x 2 image, black left column, white right: RGB values 0 0 0 | 1 1 1 | 0 0 0 | 1 1 1, mean 1/2,
    # so +-1/2 over 12 values, whose norm is sqrt(3)
    columns = Image.fromarray(np.array([[0, 255], [0, 255]], dtype=np.uint8))
    expected = np.array([-1, -1, -1, 1, 1, 1] * 2) / (2 * np.sqrt(3))
    assert embedder.dim == 12
    np.testing.assert_allclose(embedder.embed([columns])[0], expected, atol=1e-7)
    # any size is resized to the square, without keeping the aspect: 4 x 2 of the same columns, twice as wide
    wide = Image.fromarray(np.array([[0, 0, 255, 255], [0, 0, 255, 255]], dtype=np.uint8))
    np.testing.assert_allclose(embedder.embed([wide])[0], expected, atol=1e-7)
    # another side is another model: its vectors are never compared with these
    assert build_embedder("raw_pixels", crop_size=3).fingerprint != embedder.fingerprint
    with pytest.raises(ValueError, match="raw_pixels has no weights"):
        build_embedder("raw_pixels", weights="w.pth")


def cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["dinov2", *args])
    with pytest.raises(SystemExit) as exit_status:
        run()
    return exit_status.value.code, capsys.readouterr().out


@pytest.fixture
def photo_sets(tmp_path, photos, monkeypatch):
    """In tmp_path (the working directory): manifests of a pool (the 4 photos and their mirror images) and of a
    seed set (the astronaut, 40 px smaller); params.yaml embeds dedup's sets with the copy descriptor and
    retrieval's with raw pixels at 16 px."""
    monkeypatch.chdir(tmp_path)
    for name in ("pool", "seed"):
        (tmp_path / name).mkdir()
    for index, photo in enumerate(photos):
        photo.save(tmp_path / "pool" / f"photo_{index}.png")
        photo.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "pool" / f"mirrored_{index}.png")
    astronaut = photos[0]
    astronaut.resize((astronaut.width - 40, astronaut.height - 40)).save(tmp_path / "seed" / "astronaut.png")
    params = {
        "embed": {"model": "copy_descriptor", "num_workers": 0},
        "retrieve": {"embedder": {"model": "raw_pixels", "crop_size": 16, "num_workers": 0}, "n_clusters": 2,
                     "default": {"mode": "sample", "k": 1}},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    for name in ("pool", "seed"):
        run_prepare(tmp_path / name, name, name, tmp_path / "m" / name, PrepareParams())
    return tmp_path


def test_retrieval_embeddings_come_from_retrieve_embedder_and_retrieve_refuses_the_copy_detectors(
    photo_sets, monkeypatch, capsys, mlflow_uri
):
    for name in ("pool", "seed"):
        embed = ["embed", "--manifest", f"m/{name}/manifest.parquet"]
        code, out = cli([*embed, "--out", f"semantic/{name}", "--section", "retrieve.embedder"], monkeypatch, capsys)
        assert code == 0, out
        code, out = cli([*embed, "--out", f"copies/{name}"], monkeypatch, capsys)
        assert code == 0, out
    kept, copies, semantic, out = (photo_sets / name for name in ("m/pool/manifest.parquet", "copies", "semantic", "r"))
    embedded = json.loads((semantic / "pool" / "embeddings.json").read_text())
    assert (embedded["embedder"], embedded["dim"]) == ("raw_pixels", 3 * 16 * 16)
    assert json.loads((copies / "pool" / "embeddings.json").read_text())["embedder"] == "copy_descriptor"

    params = RetrieveParams.model_validate(json.loads((photo_sets / "params.yaml").read_text())["retrieve"])
    with pytest.raises(EmbeddingError) as refused:
        run_retrieve(copies / "pool", kept, [copies / "seed"], out, params)
    assert str(refused.value) == (
        f"{copies / 'pool'} holds embeddings of copy_descriptor, but retrieve.embedder.model is raw_pixels: embed "
        "the pool and seed sets with `dinov2 embed --section retrieve.embedder`"
    )
    # a seed set of the other embedder is refused by the older guard, which names both models
    with pytest.raises(EmbeddingError, match="embeddings of raw_pixels .* embeddings of copy_descriptor"):
        run_retrieve(copies / "pool", kept, [semantic / "seed"], out, params)
    assert not out.exists()

    # the shrunken astronaut's nearest pool image in raw pixels is the astronaut, not its mirror image
    metrics = run_retrieve(semantic / "pool", kept, [semantic / "seed"], out, params)
    assert metrics["retrieve/curated"] == 1
    assert [Path(path).name for path in pq.read_table(out / "curated.parquet")["path"].to_pylist()] == ["photo_0.png"]


def test_an_unknown_embed_section_is_one_line_naming_it(photo_sets, monkeypatch, capsys):
    code, out = cli(["embed", "--manifest", "m/pool/manifest.parquet", "--out", "e", "--section", "retrieve"],
                    monkeypatch, capsys)  # fmt: skip
    assert (code, out) == (2, "error: --section retrieve: expected embed or retrieve.embedder\n")
    assert not (photo_sets / "e").exists()
