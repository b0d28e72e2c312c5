"""SSCD's objective: InfoNCE between two copies of each image, plus an entropy (KoLeo) regulariser.

For a batch of B images seen as two views each (2B unit vectors), ``info_nce`` is the cross-entropy of
picking each vector's other view among the 2B - 1 other vectors, on cosines divided by ``temperature``.
``entropy_regulariser`` is the Kozachenko-Leonenko estimate of the descriptors' differential entropy,
negated: ``-mean_i log(min_j ||z_i - z_j||)`` over vectors j of OTHER images (the project's ``KoLeoLoss``
on each set of views). Minimising it spreads unrelated images apart, which is what makes one global
threshold work for copy detection (SSCD).
"""

import torch
import torch.nn.functional as F

from dinov2.loss.koleo_loss import KoLeoLoss


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    vectors = torch.cat([first, second])
    count = len(first)
    # Row i's target is its other view: i + B for a first view, i - B for a second.
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(vectors.device)
    logits = vectors @ vectors.T / temperature
    logits = logits.masked_fill(torch.eye(len(vectors), dtype=torch.bool, device=vectors.device), float("-inf"))
    return F.cross_entropy(logits, partner)


def entropy_regulariser(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The KoLeo loss of each set of views (one view per image, so a vector's nearest other is another image)."""
    koleo = KoLeoLoss()
    return (koleo(first) + koleo(second)) / 2
