"""Weighted k-nearest-neighbour classification on frozen features (the DINO / DINOv2 kNN protocol).

Features are L2-normalised, similarity is the cosine, and each of the k nearest training samples
votes for its class with weight ``exp(sim / T)``. This is the one kNN of the codebase: the
pretraining engine reports the teacher's kNN accuracy with this function, and ``dinov2 evaluate``
uses it too.

Memory stays bounded for large training sets: test rows are processed ``chunk_size`` at a time and,
within a chunk, the training set is scanned in blocks whose similarity matrix holds at most
``_SIMILARITY_BLOCK_ELEMENTS`` entries, merging a running top-k. 10^6 training features of width 1536
thus need the features themselves plus about 256 MiB of scratch space.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# 2^26 float32 similarities = 256 MiB of scratch per (test chunk, train block).
_SIMILARITY_BLOCK_ELEMENTS = 1 << 26


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int],
    temperature: float,
    chunk_size: int,
) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(
            f"features must be 2-D (samples, dim); got train {tuple(train_features.shape)}, "
            f"test {tuple(test_features.shape)}"
        )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dim {train_features.shape[1]} but test features dim {test_features.shape[1]}"
        )
    for name, features, labels in (("train", train_features, train_labels), ("test", test_features, test_labels)):
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"{name} labels must be 1-D with one label per feature row; "
                f"got labels {tuple(labels.shape)} for features {tuple(features.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"{name} labels must be integer class indices, got dtype {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{name} labels hold negative class indices (min {int(labels.min())})")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("kNN needs at least one train and one test sample")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    if max(ks) > train_features.shape[0]:
        raise ValueError(f"k={max(ks)} exceeds the {train_features.shape[0]} training samples")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _nearest(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities and indices of each query over the training set, scanned in blocks."""
    block = max(k, _SIMILARITY_BLOCK_ELEMENTS // max(queries.shape[0], 1))
    best_sims = queries.new_empty(queries.shape[0], 0)
    best_index = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, train.shape[0], block):
        sims = queries @ train[start : start + block].T
        block_sims, block_index = sims.topk(min(k, sims.shape[1]), dim=1)
        merged_sims = torch.cat([best_sims, block_sims], dim=1)
        merged_index = torch.cat([best_index, block_index + start], dim=1)
        best_sims, order = merged_sims.topk(min(k, merged_sims.shape[1]), dim=1)
        best_index = merged_index.gather(1, order)
    return best_sims, best_index


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy of weighted kNN for every k: ``{"knn_top1_k20": 0.81, "knn_top5_k20": ...}``.

    Computation happens on the device of ``train_features`` (move both sets to a GPU to use it).
    Ties between classes go to the lower class index. With 5 classes or fewer, top-5 is 1.0.
    """
    _check_inputs(train_features, train_labels, test_features, test_labels, ks, temperature, chunk_size)
    device = train_features.device
    train = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    top5_width = min(5, num_classes)
    max_k = max(ks)
    correct_top1 = dict.fromkeys(ks, 0)
    correct_top5 = dict.fromkeys(ks, 0)
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].to(device).float(), dim=1)
        truth = test_labels[start : start + chunk_size]
        sims, index = _nearest(queries, train, max_k)
        neighbour_labels = train_labels[index]
        weights = (sims / temperature).exp()
        for k in ks:
            votes = torch.zeros(queries.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            # Stable descending sort: equal votes keep class order, so ties go to the lower index.
            ranked = votes.sort(dim=1, descending=True, stable=True).indices[:, :top5_width]
            hits = ranked == truth[:, None]
            correct_top1[k] += int(hits[:, 0].sum())
            correct_top5[k] += int(hits.any(dim=1).sum())
    total = test_features.shape[0]
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"knn_top1_k{k}"] = correct_top1[k] / total
        metrics[f"knn_top5_k{k}"] = correct_top5[k] / total
    return metrics
