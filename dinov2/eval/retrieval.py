"""Retrieval on frozen features: mean average precision and recall@k over ranked gallery lists.

A query's relevant gallery items are those with the same key: the class label for class-level
retrieval, the gallery index of the original image for instance-level retrieval (augmented copies as
queries against a gallery, as in copy detection). Ranking is by cosine similarity over the whole
gallery, so mAP is exact (no truncated list). recall@k is the fraction of queries with at least one
relevant item among their k first results.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def average_precision(relevant_in_rank_order: torch.Tensor) -> torch.Tensor:
    """AP of each row of a (queries, gallery) boolean matrix in rank order: mean of precision@rank over
    the ranks of the relevant items. Rows without any relevant item are refused.
    """
    relevant = relevant_in_rank_order.float()
    n_relevant = relevant.sum(dim=1)
    if bool((n_relevant == 0).any()):
        raise ValueError(f"{int((n_relevant == 0).sum())} queries have no relevant item in the gallery")
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    precision_at_rank = relevant.cumsum(dim=1) / ranks
    return (precision_at_rank * relevant).sum(dim=1) / n_relevant


def retrieval_metrics(
    query_features: torch.Tensor,
    query_keys: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_keys: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """``{"map": ..., "recall_k1": ..., ...}`` for cosine-ranked retrieval of the gallery by each query."""
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(f"query dim {query_features.shape[1]} != gallery dim {gallery_features.shape[1]}")
    if max(ks) > gallery_features.shape[0]:
        raise ValueError(f"recall@{max(ks)} needs at least {max(ks)} gallery items, got {gallery_features.shape[0]}")
    gallery = F.normalize(gallery_features.float(), dim=1)
    ap_sum, hits = 0.0, dict.fromkeys(ks, 0)
    for start in range(0, query_features.shape[0], chunk_size):
        queries = F.normalize(query_features[start : start + chunk_size].float(), dim=1)
        order = (queries @ gallery.T).sort(dim=1, descending=True, stable=True).indices
        relevant = gallery_keys[order] == query_keys[start : start + chunk_size, None]
        ap_sum += float(average_precision(relevant).sum())
        for k in ks:
            hits[k] += int(relevant[:, :k].any(dim=1).sum())
    total = query_features.shape[0]
    return {"map": ap_sum / total, **{f"recall_k{k}": hits[k] / total for k in ks}}
