"""iBOT loss: the DINO cross-entropy on the patch tokens the student saw masked."""

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.loss.distributed import all_reduce_sum
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the reference's public name)
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_patch_tokens.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """(n_masked, K) -> assignments; the batch size is the number of masked patches on all ranks."""
        n_global = all_reduce_sum(n_masked_patches_tensor.clone().to(teacher_output.device, torch.float32))
        return sinkhorn_knopp(teacher_output, teacher_temp, n_global, n_iterations)

    def forward(
        self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor
    ) -> torch.Tensor:
        """Dense form: (B, N, K) student/teacher, (B, N) masks; per-image mean over masked patches, then mean."""
        per_patch = torch.sum(
            teacher_patch_tokens * F.log_softmax(student_patch_tokens.float() / self.student_temp, -1), -1
        )
        masks = student_masks_flat.float()
        per_image = (per_patch * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gathered form: only the masked patches, each weighted 1 / (masked patches of its image),
        summed and divided by the number of images: the same value as ``forward``."""
        log_probs = F.log_softmax(student_patch_tokens_masked.float() / self.student_temp, dim=-1)
        per_patch = torch.sum(teacher_patch_tokens_masked * log_probs, dim=-1)
        if masks_weight is None:
            per_image_count = student_masks_flat.sum(dim=-1, keepdim=True).clamp(min=1).float()
            masks_weight = (1.0 / per_image_count).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            per_patch = per_patch[:n_masked_patches]
            masks_weight = masks_weight[:n_masked_patches]
        return -(per_patch * masks_weight).sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: torch.Tensor) -> None:
        """EMA of the teacher's mean output over every masked patch of the global batch."""
        flat = teacher_patch_tokens.float().reshape(-1, teacher_patch_tokens.shape[-1])
        totals = all_reduce_sum(torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])]))
        batch_mean = (totals[:-1] / totals[-1]).view(1, 1, -1)
        updated = torch.add(self.center * self.center_momentum, batch_mean, alpha=1 - self.center_momentum)
        # no masked patch anywhere: the centre stays; chosen on the device, without the host waiting for it
        self.center.copy_(torch.where(totals[-1] > 0, updated, self.center))
