"""kNN on constructed features whose neighbours and votes can be worked out by hand."""

import math

import pytest
import torch

import dinov2.eval.knn as knn_module
from dinov2.eval.knn import knn_classify


def unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def test_nearest_neighbour_accuracy_on_four_directions_is_three_quarters():
    # Two training points near each axis direction; every test point sits on an axis, and the last
    # one carries a wrong label on purpose: 1-NN gets 3 of 4 right.
    train = torch.tensor([unit(a) for a in (-5, 5, 85, 95, 175, 185, 265, 275)])
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    test = torch.tensor([unit(0), unit(90), unit(180), unit(270)])
    test_labels = torch.tensor([0, 1, 2, 0])
    metrics = knn_classify(train, train_labels, test, test_labels, ks=(1, 2))
    assert metrics == {"knn_top1_k1": 0.75, "knn_top5_k1": 1.0, "knn_top1_k2": 0.75, "knn_top5_k2": 1.0}


@pytest.mark.parametrize(("temperature", "expected_top1"), [(0.07, 1.0), (1.0, 0.0)])
def test_votes_are_weighted_by_exp_similarity_over_temperature(temperature, expected_top1):
    # Query (1, 0). Neighbours: one of class 0 at cosine 1.0, two of class 1 at cosine 0.8.
    # T = 0.07: exp(1/0.07) = 1.6e6 > 2 exp(0.8/0.07) = 1.8e5 -> class 0 (right).
    # T = 1:    exp(1) = 2.72 < 2 exp(0.8) = 4.45 -> class 1 (wrong).
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    metrics = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ks=(3,),
                           temperature=temperature)  # fmt: skip
    assert metrics["knn_top1_k3"] == expected_top1


def test_features_are_l2_normalised_inside():
    # Scaling a training vector by 100 must not change its cosine similarity, hence not the answer.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]) * torch.tensor([[1.0], [100.0], [100.0]])
    metrics = knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[3.0, 0.0]]), torch.tensor([0]), ks=(3,))
    assert metrics["knn_top1_k3"] == 1.0


def test_top5_counts_the_true_class_among_the_five_most_voted():
    # Seven classes, one neighbour each, similarity decreasing with the class index. The query of
    # class 4 is the 5th most voted (top-5 hit); the query of class 5 is the 6th (miss).
    angles = [0, 10, 20, 30, 40, 50, 60]
    train = torch.tensor([unit(a) for a in angles])
    train_labels = torch.arange(7)
    test = torch.tensor([unit(-1), unit(-1)])
    metrics = knn_classify(train, train_labels, test, torch.tensor([4, 5]), ks=(7,))
    assert metrics["knn_top1_k7"] == 0.0
    assert metrics["knn_top5_k7"] == 0.5


def test_chunking_over_test_rows_and_train_blocks_gives_the_same_answer(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(500, 16, generator=generator)
    train_labels = torch.randint(0, 10, (500,), generator=generator)
    test = torch.randn(97, 16, generator=generator)
    test_labels = torch.randint(0, 10, (97,), generator=generator)
    whole = knn_classify(train, train_labels, test, test_labels, ks=(10, 20, 100, 200), chunk_size=4096)
    # Blocks of 7 train rows per 10-row test chunk force many partial top-k merges.
    monkeypatch.setattr(knn_module, "_SIMILARITY_BLOCK_ELEMENTS", 70)
    chunked = knn_classify(train, train_labels, test, test_labels, ks=(10, 20, 100, 200), chunk_size=10)
    assert chunked == whole


def test_bad_inputs_are_refused_with_the_reason():
    features, labels = torch.randn(5, 4), torch.arange(5)
    with pytest.raises(ValueError, match="k=20 exceeds the 5 training samples"):
        knn_classify(features, labels, features, labels, ks=(20,))
    with pytest.raises(ValueError, match="dim 4 but test features dim 3"):
        knn_classify(features, labels, torch.randn(2, 3), labels[:2], ks=(1,))
    with pytest.raises(ValueError, match="integer class indices"):
        knn_classify(features, labels.float(), features, labels, ks=(1,))
    with pytest.raises(ValueError, match="one label per feature row"):
        knn_classify(features, labels[:4], features, labels, ks=(1,))
