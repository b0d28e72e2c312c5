"""The copy descriptor trained on a pool (``dinov2 train-descriptor``), and released SSCD models as embedders."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from dinov2.atomic import write_table
from dinov2.configuration.curation import DescriptorParams, EmbedParams
from dinov2.copydetect.calibration import calibrate
from dinov2.copydetect.copy_descriptor import copy_descriptor
from dinov2.copydetect.edits import crop_fraction
from dinov2.copydetect.loss import entropy_regulariser, info_nce
from dinov2.copydetect.training import describe, fit
from dinov2.curation.embed import embed
from dinov2.curation.manifest import build_manifest
from dinov2.data.fashion_mnist import load_fashion_mnist

# A descriptor that trains in seconds on 28 px images: 2 stages of width 8, 32 values.
TINY = dict(input_size=28, width=8, stages=2, blocks_per_stage=1, dim=32, num_workers=0)


def tiny_params(**overrides) -> DescriptorParams:
    return DescriptorParams(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def garments() -> list[Image.Image]:
    """256 Fashion-MNIST test images (seeded draw) as RGB: a small pool of real, look-alike images."""
    images, _ = load_fashion_mnist(train=False)
    chosen = np.random.default_rng(0).choice(len(images), size=256, replace=False)
    return [Image.fromarray(images[index]).convert("RGB") for index in chosen]


def test_training_is_deterministic_whoever_makes_the_views_and_lowers_the_loss(garments):
    params = tiny_params(epochs=2, batch_size=16)
    runs = [fit(garments[:64], params.model_copy(update={"num_workers": workers}), seed=1) for workers in (0, 0, 2)]
    states = [model.state_dict() for model, _ in runs]
    for other in states[1:]:
        assert all(torch.equal(states[0][name], other[name]) for name in states[0])
    reseeded, _ = fit(garments[:64], params, seed=2)
    assert not torch.equal(reseeded.state_dict()["projection.weight"], states[0]["projection.weight"])
    losses = [step["loss"] for step in runs[0][1]]
    assert len(losses) == 2 * 4  # 64 images in batches of 16, 2 epochs
    # Measured: 5.36, 5.05, 4.90 for the first three steps, about 4 for the last three.
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5


def test_info_nce_and_the_entropy_term_on_two_images_by_hand():
    """Views e1, e2 | e1, e2 at temperature 1: each row sees its other view at cosine 1 and two vectors at 0, so
    the loss is -log(e / (e + 2)). The nearest other image is at distance sqrt(2): the entropy term is -log sqrt 2."""
    views = torch.eye(2)
    assert info_nce(views, views.clone(), temperature=1.0).item() == pytest.approx(np.log(1 + 2 / np.e))
    assert entropy_regulariser(views, views.clone()).item() == pytest.approx(-np.log(np.sqrt(2)), abs=1e-6)


def crop_and_flip(image: Image.Image, seed: int) -> Image.Image:
    """A medium-strength copy: 75% of each side at a random position, resized back, mirrored."""
    kept = crop_fraction(image, 0.75, 0.75, np.random.default_rng(seed))
    return ImageOps.mirror(kept.resize(image.size, Image.BICUBIC))


def nearest_is_original(queries: np.ndarray, pool: np.ndarray) -> float:
    """Share of copies (query i copies pool image i) whose most similar pool image is their original."""
    return float(np.mean((queries @ pool.T).argmax(axis=1) == np.arange(len(queries))))


def test_the_trained_descriptor_finds_cropped_mirrored_copies_the_copy_descriptor_misses(garments):
    """128 garments, 64 of them copied (75% of each side, mirrored): how often is a copy's nearest garment its
    original? Measured: 0.375 for the tiny descriptor after 48 steps, 0.156 for the copy descriptor."""
    pool = garments[:128]
    params = tiny_params(epochs=12, batch_size=32)
    model, _ = fit(pool, params, seed=0)
    copies = [crop_and_flip(image, seed) for seed, image in enumerate(pool[:64])]
    trained = nearest_is_original(describe(model, copies), describe(model, pool))
    handmade = nearest_is_original(
        np.stack([copy_descriptor(copy) for copy in copies]), np.stack([copy_descriptor(image) for image in pool])
    )
    assert handmade < 0.2
    assert trained > handmade + 0.15


def test_calibration_picks_the_lowest_cosine_that_meets_the_precision_target():
    """Four originals (basis vectors) with copies at cosines 0.98, 0.90, 0.80, 0.60; originals 1 and 2 resemble
    each other (cosine 0.85), so the false pairs are o1-o2 0.85, c1-o2 0.833, o1-c2 0.765, c1-c2 0.7497 and the
    rest 0. By decreasing cosine: T T F F T F F T, so precision 1 down to 0.90, 3/5 at 0.80, 4/8 at 0.60."""
    basis = np.eye(16)
    originals = basis[:4].copy()
    originals[1] = 0.85 * basis[0] + np.sqrt(1 - 0.85**2) * basis[1]
    own = np.array([0.98, 0.90, 0.80, 0.60])
    copies = own[:, None] * originals + np.sqrt(1 - own[:, None] ** 2) * basis[4:8]
    # Ten other pool images whose best cosine to an original (o1) is 0.95, 0.7, 0.4 and 0 for the other seven.
    reach = np.array([0.95, 0.7, 0.4] + [0.0] * 7)
    pool = reach[:, None] * basis[0] + np.sqrt(1 - reach[:, None] ** 2) * basis[6:16]
    strengths = ["planted", "strong", "planted", "strong"]

    strict = calibrate(originals, copies, strengths, pool, precision_target=0.99, false_removal_target=0.1)
    assert strict.self_threshold == pytest.approx(0.90, abs=1e-3)
    assert (strict.self_precision, strict.true_pairs_above_self, strict.false_pairs_above_self) == (1.0, 2, 0)
    assert strict.self_recall == {"all": 0.5, "planted": 0.5, "strong": 0.5}
    # The 0.95 image is linked to o1 at the self threshold: a copy, not a false removal. Of the nine others,
    # 10% may be removed, which is none: the threshold lies just above 0.7, and 0.98, 0.90, 0.80 reach it.
    assert strict.relative_threshold == pytest.approx(0.70, abs=1e-3)
    assert strict.relative_recall == {"all": 0.75, "planted": 1.0, "strong": 0.5}
    assert strict.relative_false_removal == 0.0

    loose = calibrate(originals, copies, strengths, pool, precision_target=0.6, false_removal_target=0.1)
    assert loose.self_threshold == pytest.approx(0.80, abs=1e-3)
    assert (loose.true_pairs_above_self, loose.false_pairs_above_self) == (3, 2)
    assert loose.self_recall["all"] == 0.75

    lenient = calibrate(originals, copies, strengths, pool, precision_target=0.5, false_removal_target=0.1)
    assert lenient.self_threshold == pytest.approx(0.60, abs=1e-3)
    assert lenient.self_precision == 0.5 and lenient.self_recall["all"] == 1.0
    # Now the 0.95 and the 0.7 images are copies of o1; none of the other eight may go: just above 0.4.
    assert lenient.relative_threshold == pytest.approx(0.40, abs=1e-3)
    assert lenient.relative_false_removal == 0.0


class TinySSCD(nn.Module):
    """SSCD's shape in miniature: a convolution, GeM pooling, a projection, L2 normalisation."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.projection = nn.Linear(8, 6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.conv(pixels)).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1.0 / 3)
        return F.normalize(self.projection(features), dim=-1)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_an_sscd_torchscript_file_embeds_with_sscd_preprocessing_and_records_the_paper_thresholds(
    tmp_path, photo_files
):
    torch.manual_seed(0)
    network = TinySSCD().eval()
    torch.jit.save(torch.jit.script(network), tmp_path / "sscd_tiny.torchscript.pt")
    built = build_manifest(photo_files, "web", "pool")
    write_table(built.table, tmp_path / "manifest.parquet")
    name = f"sscd:{tmp_path / 'sscd_tiny.torchscript.pt'}"

    embed(tmp_path / "manifest.parquet", tmp_path / "e", EmbedParams(model=name, num_workers=0, device="cpu"))

    meta = json.loads((tmp_path / "e" / "embeddings.json").read_text())
    assert (meta["embedder"], meta["thresholds_calibrated_for"], meta["dim"]) == (name, name, 6)
    assert meta["thresholds"] == {"self": 0.6, "relative": 0.45}
    # SSCD's batch preprocessing by hand: 320 x 320 (aspect not kept), ImageNet mean and deviation.
    paths = pq.read_table(tmp_path / "e" / "manifest.parquet").column("path").to_pylist()
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((320, 320), Image.BILINEAR)) for p in paths])
    normalised = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.inference_mode():
        expected = network(torch.from_numpy(normalised).permute(0, 3, 1, 2).float()).numpy()
    stored = np.load(tmp_path / "e" / "shards" / "vectors-00000.npy")
    rows = np.load(tmp_path / "e" / "shards" / "rows-00000.npy")
    np.testing.assert_allclose(stored.astype(np.float32), expected[rows], atol=2e-3)


def test_bad_input_is_one_line_naming_the_problem_and_leaves_no_output(tmp_path, photo_files, monkeypatch, cli_error):
    monkeypatch.chdir(tmp_path)
    out = cli_error(["train-descriptor", "--manifest", "missing.parquet", "--out", "d"])
    assert out == "error: manifest not found: missing.parquet\n"

    write_table(build_manifest(photo_files, "web", "pool").table, tmp_path / "m.parquet")
    out = cli_error(["train-descriptor", "--manifest", "m.parquet", "--out", "d"])
    assert out == (
        "error: m.parquet holds 4 images: too few to hold out descriptor.calibration.images = 500 for "
        "calibration and train on the rest (at least 2)\n"
    )
    (tmp_path / "params.yaml").write_text("descriptor:\n  widht: 8\n")
    out = cli_error(["train-descriptor", "--manifest", "m.parquet", "--out", "d"])
    assert out == "error: params.yaml [descriptor]: unknown key 'widht'\n"

    for model, message in [
        ("descriptor:nowhere", "error: nowhere is not a descriptor folder (no descriptor.json or "
         "descriptor.safetensors); write one with `dinov2 train-descriptor`\n"),
        ("sscd:missing.pt", "error: SSCD TorchScript file not found: missing.pt\n"),
        ("sscdd", "error: unknown model 'sscdd'"),
    ]:  # fmt: skip
        (tmp_path / "params.yaml").write_text(f"embed:\n  model: '{model}'\n  num_workers: 0\n")
        out = cli_error(["embed", "--manifest", "m.parquet", "--out", "e"])
        assert out.startswith(message) and out.count("\n") == 1
    (tmp_path / "not_torchscript.pt").write_bytes(b"not a model")
    (tmp_path / "params.yaml").write_text("embed:\n  model: 'sscd:not_torchscript.pt'\n  num_workers: 0\n")
    out = cli_error(["embed", "--manifest", "m.parquet", "--out", "e"])
    assert out.startswith("error: not_torchscript.pt is not a TorchScript model") and out.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet", "not_torchscript.pt", "params.yaml"]


@pytest.mark.slow
def test_train_descriptor_then_embed_and_dedup_use_the_thresholds_it_calibrated(
    tmp_path, garments, mlflow_uri, run_dinov2
):
    (tmp_path / "pool").mkdir()
    for index, image in enumerate(garments[:72]):
        image.save(tmp_path / "pool" / f"{index}.png")
    params = {"descriptor": {**TINY, "epochs": 2, "batch_size": 16, "calibration": {"images": 12, "pool_images": 40}},
              "embed": {"model": "descriptor:desc", "num_workers": 0}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    for command in (
        ["prepare", "--images", "pool", "--source", "web", "--split", "pool", "--out", "m"],
        ["train-descriptor", "--manifest", "m/manifest.parquet", "--out", "desc"],
        ["embed", "--manifest", "m/manifest.parquet", "--out", "e"],
        ["dedup", "--pool", "e", "--out", "d"],
    ):
        result = run_dinov2(*command, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr

    descriptor = json.loads((tmp_path / "desc" / "descriptor.json").read_text())
    thresholds = descriptor["thresholds"]
    assert descriptor["calibration"]["originals"] == 12 and descriptor["calibration"]["pool_images"] == 40
    assert descriptor["training"]["metrics"]["descriptor/train_images"] == 60
    assert descriptor["training"]["metrics"]["descriptor/steps"] == 2 * (60 // 16)
    assert sorted(p.name for p in (tmp_path / "desc").iterdir()) == [
        "descriptor.json", "descriptor.safetensors", "metrics.json", "plots"
    ]  # fmt: skip
    embedded = json.loads((tmp_path / "e" / "embeddings.json").read_text())
    assert embedded["thresholds"] == thresholds
    assert embedded["embedder"] == embedded["thresholds_calibrated_for"] == "descriptor:desc"
    dedup = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert dedup["dedup/self_threshold"] == thresholds["self"]

    import mlflow

    runs = mlflow.search_runs(experiment_names=["dinov2/train-descriptor"], output_format="list")
    logged = [r for r in runs if r.data.params.get("manifest") == "m/manifest.parquet"]
    assert len(logged) == 1
    assert logged[0].data.metrics["descriptor/self_threshold"] == pytest.approx(thresholds["self"])
