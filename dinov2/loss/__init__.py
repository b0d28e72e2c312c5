"""The DINOv2 self-supervised objective: DINO (CLS), iBOT (masked patches) and KoLeo."""

from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss
from dinov2.loss.sinkhorn_knopp import sinkhorn_knopp

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp"]
