"""DINO loss on the CLS token: cross-entropy between sharpened teacher targets and student predictions."""

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.loss.distributed import all_reduce_sum, world_size
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, teacher_output.shape[0] * world_size(), n_iterations)

    def forward(
        self, student_output_list: list[torch.Tensor], teacher_out_softmaxed_centered_list: list[torch.Tensor]
    ) -> torch.Tensor:
        """Sum over (student, teacher) pairs of the batch-mean cross-entropy -sum(p_t * log_softmax(s / T_s))."""
        total = 0.0
        for student_output in student_output_list:
            log_probs = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
            for teacher_probs in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(teacher_probs * log_probs, dim=-1).mean()
        return total

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output over the global batch."""
        batch_sum = all_reduce_sum(teacher_output.float().sum(dim=0, keepdim=True))
        batch_mean = batch_sum / (teacher_output.shape[0] * world_size())
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1 - self.center_momentum)
