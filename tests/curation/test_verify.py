"""Pixel verification of duplicate candidates, and the pool that leaves out the source's own near-twins: real
Fashion-MNIST images and the edits the pipeline plants."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dinov2.configuration.curation import DefaultData, VerifyParams
from dinov2.copydetect.edits import Edit, apply_edits
from dinov2.copydetect.verify import aligned_correlation, verified_edges, verify_pairs
from dinov2.curation.dedup import keep_one_per_component, knn_edges, self_dedup
from dinov2.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from dinov2.demo_data.build import select
from dinov2.demo_data.sources import open_source

# Strong geometric edits of the kinds prepare plants: crops to 82-85%, rotations of 6-10 degrees, mirror.
HARD_EDITS = [
    [Edit("crop", 0.85, (2, 2))],
    [Edit("crop", 0.82, (0, 5)), Edit("flip")],
    [Edit("rotate", -10.0), Edit("flip"), Edit("brightness", 1.25)],
    [Edit("crop", 0.85, (4, 0)), Edit("rotate", -6.0)],
]


def grey(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)


def first_of_class(name: str, count: int) -> list[Image.Image]:
    pixels, labels = load_fashion_mnist(train=True)
    return [Image.fromarray(image, mode="L") for image in pixels[labels == FASHION_MNIST_CLASSES.index(name)][:count]]


@pytest.fixture(scope="module")
def trousers() -> list[Image.Image]:
    """The first 16 trousers of Fashion-MNIST's train split: the class whose items look most alike."""
    return first_of_class("trouser", 16)


def edited(image: Image.Image, edits: list[Edit]) -> Image.Image:
    return apply_edits(image, edits)


SEARCH = VerifyParams()  # the alignment's default bounds and steps


def test_an_edited_copy_outscores_every_other_item_of_its_class(trousers):
    originals = trousers[: len(HARD_EDITS)]
    copies = torch.stack([grey(edited(image, edits)) for image, edits in zip(originals, HARD_EDITS, strict=True)])
    others = torch.stack([grey(image) for image in trousers])
    # every copy against every trousers image: its own original and 15 others
    first = copies.repeat_interleave(len(others), 0)
    second = others.repeat(len(copies), 1, 1)
    scores = aligned_correlation(first, second, SEARCH).reshape(len(copies), len(others)).numpy()
    own = scores[np.arange(len(copies)), np.arange(len(copies))]
    assert (own >= 0.97).all(), own
    scores[np.arange(len(copies)), np.arange(len(copies))] = -1
    assert (own > scores.max(axis=1)).all(), (own, scores.max(axis=1))
    # the verification is symmetric in its two images
    np.testing.assert_array_equal(
        aligned_correlation(copies, others[:4], SEARCH), aligned_correlation(others[:4], copies, SEARCH)
    )


def test_a_cropped_and_rotated_copy_of_an_item_that_fills_its_canvas_still_verifies():
    """Rotating a cropped bag or shirt pushes its corners off the canvas and fills them black; the warp of the
    original is masked the same way, so the copy still scores above the pipeline's 0.984 (unmasked, as low as
    0.94)."""
    originals = [*first_of_class("bag", 8), *first_of_class("shirt", 8)]
    edits = [Edit("crop", 0.85, (2, 2)), Edit("rotate", 8.0)]
    copies = torch.stack([grey(edited(image, edits)) for image in originals])
    scores = aligned_correlation(copies, torch.stack([grey(image) for image in originals]), SEARCH)
    assert (scores >= 0.984).all(), scores


def test_relative_dedup_checks_its_pairs_at_its_own_threshold(tmp_path):
    """verify.relative_threshold (null: verify.threshold) decides the pool-evaluation pairs."""
    bags = first_of_class("bag", 2)
    paths = []
    for n, image in enumerate([bags[0], edited(bags[0], HARD_EDITS[0]), bags[1]]):
        paths.append(str(tmp_path / f"{n}.png"))
        image.save(paths[-1])
    edges = np.array([[0, 1], [0, 2]])  # a copy and a look-alike
    copy, other = aligned_correlation(
        torch.stack([grey(Image.open(paths[0]))] * 2),
        torch.stack([grey(Image.open(path)) for path in paths[1:]]),
        SEARCH,
    ).tolist()
    strict = (copy + other) / 2  # between the copy's score and the look-alike's
    kept = {}
    for kind, verify in [
        ("self", VerifyParams(threshold=strict, relative_threshold=0.0)),
        ("relative", VerifyParams(threshold=0.0, relative_threshold=strict)),
        ("relative", VerifyParams(threshold=strict)),
        ("self", VerifyParams(threshold=0.0, relative_threshold=strict)),
    ]:
        holding, counts = verify_pairs(edges, paths, verify, relative=kind == "relative")
        kept.setdefault(kind, []).append(holding.tolist())
        assert counts[f"dedup/{kind}_candidate_pairs"] == 2
    assert kept == {"self": [[[0, 1]], [[0, 1], [0, 2]]], "relative": [[[0, 1]], [[0, 1]]]}


def test_a_distinct_match_below_the_relative_threshold_still_holds(tmp_path):
    """verify.distinct_threshold: a pool-evaluation pair below relative_threshold holds when it is the best pair
    of both its images by distinct_margin; look-alike pairs, with rivals, do not. Each pair of images is scored
    once, however many rows (an evaluation image and its views) link it."""
    bags = first_of_class("bag", 3)
    # graph rows: the copy of bag 0 and bag 2 (pool), then bag 0 twice (an image and its view) and bag 1
    images = [edited(bags[0], HARD_EDITS[3]), bags[2], bags[0], bags[0], bags[1]]
    paths = []
    for n, image in enumerate(images):
        paths.append(str(tmp_path / f"{n}.png"))
        if n != 3:
            image.save(paths[-1])
    paths[3] = paths[2]
    edges = np.array([[0, 2], [0, 3], [1, 2], [1, 4], [0, 4], [3, 1]])
    pixels = [grey(Image.open(path)) for path in paths]
    scores = aligned_correlation(
        torch.stack([pixels[0], pixels[1], pixels[1], pixels[0]]),
        torch.stack([pixels[2], pixels[2], pixels[4], pixels[4]]),
        SEARCH,
    ).tolist()
    copy, rival = scores[0], max(scores[1], scores[3])  # the copy's other pair, bag 0's other pair
    assert copy < 0.999 and copy - rival > 0.02  # the copy leads its look-alikes, below a strict threshold

    def kept(margin: float | None) -> list[list[int]]:
        verify = VerifyParams(
            relative_threshold=0.999, distinct_threshold=None if margin is None else copy - 0.01,
            distinct_margin=margin or 0.1,
        )  # fmt: skip
        holding, counts = verify_pairs(edges, paths, verify, relative=True)
        assert counts["dedup/relative_candidate_pairs"] == 4
        return holding.tolist()

    assert kept(None) == []
    assert kept((copy - rival) / 2) == [[0, 2], [0, 3]]
    assert kept(copy - rival + 0.01) == []
    with pytest.raises(ValueError, match="distinct_threshold"):
        VerifyParams(relative_threshold=0.98, distinct_threshold=0.98)


def test_verification_cuts_the_links_a_loose_threshold_makes_between_look_alikes():
    """Self-dedup on 16 bags and edited copies of 4, linked by raw-pixel cosine at a threshold loose enough to
    tie most bags together: with the pixel check at the pipeline's 0.98, exactly the copies are removed."""
    bags = first_of_class("bag", 16)
    images = [*bags, *(edited(image, edits) for image, edits in zip(bags, HARD_EDITS, strict=False))]
    thumbnails = torch.stack([grey(image) for image in images])
    vectors = thumbnails.flatten(1).numpy()
    vectors = vectors - vectors.mean(axis=1, keepdims=True)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    loose = self_dedup(vectors, k=len(images), threshold=0.5)
    assert loose.counts()["removed"] > 10  # the cosine alone merges different trousers

    candidates = knn_edges(vectors, len(images), 0.5)
    kept, _ = verified_edges(candidates, lambda rows: thumbnails[rows], 0.98, SEARCH)
    verified = keep_one_per_component(len(images), kept)
    assert len(np.unique(np.sort(candidates, axis=1), axis=0)) > 30
    groups = sorted(sorted(members.tolist()) for members in verified.groups())
    assert groups == [[i, len(bags) + i] for i in range(len(HARD_EDITS))]
    assert np.flatnonzero(~verified.keep).tolist() == list(range(len(bags), len(images)))


def centred(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred unit vectors of (N, 28, 28) images, and of their mirror images."""
    vectors = []
    for view in (images, images[:, :, ::-1]):
        flat = view.reshape(len(view), -1).astype(np.float32)
        flat -= flat.mean(axis=1, keepdims=True)
        vectors.append(flat / np.linalg.norm(flat, axis=1, keepdims=True))
    return vectors[0], vectors[1]


def test_the_pool_leaves_out_source_images_alike_to_a_pool_or_an_eval_test_image():
    train, _ = load_fashion_mnist(train=True)
    test, _ = load_fashion_mnist(train=False)

    def alike(sizes: DefaultData) -> tuple[int, np.ndarray, np.ndarray]:
        chosen = select(open_source(sizes), sizes, np.random.default_rng(0))
        assert len(chosen.pool) == sizes.pool_images
        pool, pool_mirrored = centred(train[chosen.pool])
        within = np.maximum(pool @ pool.T, pool_mirrored @ pool.T)
        np.fill_diagonal(within, -1)
        with_test = np.maximum(*(vectors @ centred(test[chosen.eval_test])[0].T for vectors in (pool, pool_mirrored)))
        return chosen.near_twins_left_out, within, with_test

    left_out, within, with_test = alike(DefaultData(pool_images=1500, pool_duplicates=10, test_copies=10))
    assert left_out > 0
    assert within.max() < 0.95 and with_test.max() < 0.95
    # without the check the same draw holds look-alikes of both kinds
    left_out, within, with_test = alike(
        DefaultData(pool_images=1500, pool_duplicates=10, test_copies=10, near_twin_correlation=None)
    )
    assert left_out == 0
    assert within.max() >= 0.95 and with_test.max() >= 0.95


def test_the_dedup_stage_verifies_self_and_relative_pairs_and_reports_both(tmp_path, small_default_data):
    """The dedup stage with verification and an evaluation set, on the small default data embedded by the copy
    descriptor (eval images with their views): each step's counts reach metrics.json, the pairs verified are
    among the candidates, and the planted test copies leave the pool."""
    from dinov2.configuration.curation import DedupParams, EmbedParams
    from dinov2.curation.dedup import dedup
    from dinov2.curation.embed import embed

    prepared, _ = small_default_data
    for name in ("pool", "eval_test"):
        manifest = prepared / "manifests" / name / "manifest.parquet"
        embed(manifest, tmp_path / name, EmbedParams(num_workers=0, device="cpu"))
    params = DedupParams(
        k=8, self_threshold=0.75, relative_threshold=0.68,
        verify=VerifyParams(threshold=0.984, relative_threshold=0.982, distinct_threshold=0.94),
    )  # fmt: skip
    metrics = dedup(tmp_path / "pool", [tmp_path / "eval_test"], tmp_path / "dedup", params)
    pool_images = len(pq.read_table(prepared / "manifests" / "pool" / "manifest.parquet"))
    assert metrics["dedup/pool_images"] == pool_images
    for kind in ("self", "relative"):
        assert 0 < metrics[f"dedup/{kind}_verified_pairs"] <= metrics[f"dedup/{kind}_candidate_pairs"]
    assert metrics["dedup/kept"] == metrics["dedup/after_self_dedup"] - metrics["dedup/eval_leaks_removed"]
    truth = pq.read_table(prepared / "ground_truth.parquet").to_pylist()
    copies = {row["id"] for row in truth if row["kind"] == "test_copy"}
    kept = set(pq.read_table(tmp_path / "dedup" / "kept.parquet").column("id").to_pylist())
    print(f"{len(copies - kept)} of {len(copies)} test copies removed; metrics {metrics}")
    assert not copies & kept
