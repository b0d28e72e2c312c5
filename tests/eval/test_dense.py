"""Dense metrics on hand-made predictions, and the mosaic proxy set built from real images."""

import math

import pytest
import torch

from dinov2.data.transforms import make_eval_transform
from dinov2.eval.datasets import LabelledImageFolder
from dinov2.eval.dense import (
    IGNORE_INDEX,
    MosaicSegmentation,
    depth_metrics,
    segmentation_metrics,
    train_segmentation_head,
)


def test_miou_and_pixel_accuracy_of_a_hand_made_prediction():
    target = torch.tensor([[0, 0, IGNORE_INDEX], [1, 1, 1]])
    predicted = torch.tensor([[0, 1, 0], [1, 1, 1]])
    # class 0: intersection 1, union 2; class 1: intersection 3, union 4; the ignored pixel counts for nothing.
    scores = segmentation_metrics(predicted, target, num_classes=3)
    assert scores["miou"] == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 5)


def test_depth_rmse_abs_rel_and_delta1_of_a_hand_made_prediction():
    target = torch.tensor([1.0, 1.0, 4.0, 0.0])  # the 0 is "no measurement"
    predicted = torch.tensor([1.0, 2.0, 4.0, 9.0])
    scores = depth_metrics(predicted, target)
    assert scores["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert scores["abs_rel"] == pytest.approx(1 / 3)
    assert scores["delta1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no pixel of the depth target"):
        depth_metrics(predicted, torch.zeros(4))


def test_mosaic_pixels_carry_the_class_of_their_tile(image_folder):
    folder = LabelledImageFolder(image_folder(2, 1) / "train")
    mosaics = MosaicSegmentation(folder, n_mosaics=3, tile_transform=make_eval_transform(32, 32), tile_size=32)
    image, labels = mosaics[1]
    assert image.shape == (3, 64, 64) and labels.shape == (64, 64)
    tiles = mosaics.tiles[1].tolist()
    for position, sample in enumerate(tiles):
        row, col = divmod(position, 2)
        quadrant = labels[row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32]
        assert bool((quadrant == folder.labels[sample]).all())
        torch.testing.assert_close(image[:, row * 32 : (row + 1) * 32, col * 32 : (col + 1) * 32],
                                   make_eval_transform(32, 32)(folder.read(sample)))  # fmt: skip


def test_segmentation_head_learns_a_map_readable_from_the_tokens_and_is_reproducible():
    # Token channel 0 says "class 1 here" on a 4x4 grid; labels are that map upsampled to 16x16.
    generator = torch.Generator().manual_seed(0)
    grid_labels = torch.randint(0, 2, (40, 4, 4), generator=generator)
    tokens = torch.randn(40, 8, 4, 4, generator=generator) * 0.1
    tokens[:, 0] += 2.0 * grid_labels
    labels = grid_labels.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    first = train_segmentation_head(tokens, labels, 2, epochs=10, learning_rate=0.1, batch_size=8)
    torch.randn(3)  # the global RNG state must not matter
    second = train_segmentation_head(tokens, labels, 2, epochs=10, learning_rate=0.1, batch_size=8)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        predicted = first(tokens, (16, 16)).argmax(dim=1)
    # Bilinear upsampling blurs the tile borders; the tile centres must be right.
    assert segmentation_metrics(predicted[:, 1::4, 1::4], grid_labels, 2)["pixel_accuracy"] == 1.0
