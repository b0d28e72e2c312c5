"""mAP and recall@k on hand-made rankings."""

import math

import pytest
import torch

from dinov2.eval.retrieval import average_precision, retrieval_metrics


def test_average_precision_of_hand_made_rankings():
    rankings = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    # (1/1 + 2/3) / 2, (1/2 + 2/4) / 2, (1 + 1) / 2, (1/4) / 1
    expected = torch.tensor([5 / 6, 0.5, 1.0, 0.25])
    torch.testing.assert_close(average_precision(rankings), expected)


def test_a_query_without_relevant_item_is_refused():
    with pytest.raises(ValueError, match="1 queries have no relevant item"):
        average_precision(torch.tensor([[True, False], [False, False]]))


def unit(angle_degrees: float) -> list[float]:
    return [math.cos(math.radians(angle_degrees)), math.sin(math.radians(angle_degrees))]


def test_cosine_ranking_gives_hand_computed_map_and_recall():
    gallery = torch.tensor([unit(0), unit(10), unit(20), unit(90)]) * 3.0  # scale is ignored (cosine)
    gallery_keys = torch.tensor([0, 1, 0, 1])
    # Query at 4 deg, key 0: ranking 0, 10, 20, 90 deg -> relevance 1 0 1 0 -> AP 5/6, hit at 1.
    # Query at 80 deg, key 0: ranking 90, 20, 10, 0 deg -> relevance 0 1 0 1 -> AP 1/2, hit at 2.
    queries = torch.tensor([unit(4), unit(80)])
    metrics = retrieval_metrics(queries, torch.tensor([0, 0]), gallery, gallery_keys, ks=(1, 2), chunk_size=1)
    assert metrics == pytest.approx({"map": (5 / 6 + 0.5) / 2, "recall_k1": 0.5, "recall_k2": 1.0})
