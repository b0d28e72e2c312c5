"""Frozen features of a backbone over a dataset, and a cache so a suite re-run does not re-extract.

``extract_features(model, dataset)`` works on any dataset yielding ``(image_tensor, label)`` (items
that are ``None``, i.e. unreadable images, are dropped and counted) and any backbone with DINOv2's
``forward_features`` (ours, the released torch.hub models) or a plain ``forward`` returning one
vector per image.

The cache key is (checkpoint hash, dataset fingerprint, transform, feature kind): a model with other
weights, a changed image folder, another resize/crop or another token selection all re-extract.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dinov2.atomic import write_atomically
from dinov2.eval.datasets import collate_readable

logger = logging.getLogger(__name__)

FeatureFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def class_token(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The normed CLS token of the last block (what DINOv2's kNN and retrieval use)."""
    if hasattr(model, "forward_features"):
        return model.forward_features(images)["x_norm_clstoken"]
    return model(images)


def stored_blocks(model: nn.Module, wanted: int = 4) -> int:
    return min(wanted, getattr(model, "n_blocks", wanted))


def probe_tokens(model: nn.Module, images: torch.Tensor, n_blocks: int = 4) -> torch.Tensor:
    """Everything the linear-probe grid reads, concatenated: [CLS of the last ``n`` blocks, oldest
    first; mean patch token of the last block] -> (B, (n + 1) * D). The last block's CLS is the
    ``class_token`` feature, so kNN, logistic regression and retrieval slice it from the same pass.
    """
    n = stored_blocks(model, n_blocks)
    outputs = model.get_intermediate_layers(images, n=n, return_class_token=True, norm=True)
    return torch.cat([*(cls for _, cls in outputs), outputs[-1][0].mean(dim=1)], dim=1)


@dataclass
class Extraction:
    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) long
    skipped: int  # unreadable images dropped
    seconds: float


@torch.no_grad()
def extract(
    model: nn.Module | None,
    dataset: torch.utils.data.Dataset,
    feature_fn: FeatureFn = class_token,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    description: str = "features",
) -> Extraction:
    if len(dataset) == 0:
        raise ValueError("cannot extract features from an empty dataset")
    if model is not None:  # None: a feature_fn that reads the pixels themselves
        model = model.to(device).eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_readable
    )
    features, labels, seen = [], [], 0
    start = time.perf_counter()
    for batch in tqdm(loader, desc=description, unit="batch", disable=None, leave=False):
        if batch is None:
            continue
        images, batch_labels = batch
        features.append(feature_fn(model, images.to(device)).float().cpu())
        labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
        seen += len(images)
    seconds = time.perf_counter() - start
    skipped = len(dataset) - seen
    if not features:
        raise ValueError(f"none of the {len(dataset)} images could be read")
    if skipped:
        logger.warning("%s: skipped %d unreadable images of %d", description, skipped, len(dataset))
    logger.info("%s: %d images in %.1f s (%.0f img/s)", description, seen, seconds, seen / max(seconds, 1e-9))
    return Extraction(torch.cat(features), torch.cat(labels), skipped, seconds)


def extract_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    feature_fn: FeatureFn = class_token,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,) long); the normed CLS token unless ``feature_fn`` says otherwise."""
    result = extract(model, dataset, feature_fn, batch_size=batch_size, num_workers=num_workers, device=device)
    return result.features, result.labels


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, dtypes, values): the checkpoint hash of the cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class FeatureCache:
    """Extracted features on disk, one safetensors file per (checkpoint, dataset, transform, feature kind)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_hash: str, dataset_fingerprint: str, transform: str, feature_kind: str) -> str:
        identity = json.dumps([model_hash, dataset_fingerprint, transform, feature_kind])
        return hashlib.sha256(identity.encode()).hexdigest()[:32]

    def load_or_extract(
        self,
        model_hash: str,
        dataset: torch.utils.data.Dataset,
        transform: str,
        feature_kind: str,
        compute: Callable[[], Extraction],
    ) -> Extraction:
        fingerprint = getattr(dataset, "fingerprint", None)
        if fingerprint is None:
            raise ValueError(f"{type(dataset).__name__} has no 'fingerprint': its features cannot be cached")
        path = self.folder / f"{self.key(model_hash, fingerprint, transform, feature_kind)}.safetensors"
        from safetensors.torch import load_file, save_file

        if path.is_file():
            self.hits += 1
            stored = load_file(str(path))
            return Extraction(stored["features"], stored["labels"], int(stored["skipped"]), 0.0)
        self.misses += 1
        result = compute()
        tensors = {
            "features": result.features.contiguous(),
            "labels": result.labels.contiguous(),
            "skipped": torch.tensor(result.skipped),
        }
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"feature_kind": feature_kind}))
        return result
