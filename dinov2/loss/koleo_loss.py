"""KoLeo regulariser (Sablayrolles et al., 2018): push each feature away from its nearest neighbour."""

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """-mean(log(distance to the nearest other sample)) of the L2-normalised (B, D) features, in fp32.

        A batch of one sample has no neighbour: the loss is 0 (the reference returns NaN, issue #314).
        """
        if student_output.shape[0] < 2:
            return student_output.float().sum() * 0.0
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            features = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            similarities = features @ features.t()
            similarities.fill_diagonal_(-2.0)  # below any cosine: never one's own neighbour
            nearest = similarities.argmax(dim=1)
            distances = F.pairwise_distance(features, features[nearest], p=2, eps=eps)
            return -torch.log(distances + eps).mean()
