"""Sinkhorn-Knopp teacher targets: an equipartition of the batch over the prototypes."""

import torch

from dinov2.loss.distributed import all_reduce_max, all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor, teacher_temp: float, n_samples: torch.Tensor | int, n_iterations: int = 3
) -> torch.Tensor:
    """(B, K) logits -> (B, K) soft assignments whose rows sum to 1 and whose columns, summed over
    every rank's samples, are equal (each prototype gets 1/K of the global batch), in float32.

    ``n_samples`` is the global number of rows (sum over ranks).
    """
    logits = teacher_output.float() / teacher_temp
    # subtracting the global max changes nothing after normalisation but keeps exp() finite
    shift = all_reduce_max(logits.max())
    q = torch.exp(logits - shift).t()  # K x B
    n_prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # every prototype gets total weight 1/K
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # every sample gets total weight 1/B
        q /= n_samples
    q *= n_samples
    return q.t()
