"""torch.hub entry points: ``torch.hub.load("<this repository>", "dinov2_vits14", pretrained=False)``."""

from dinov2.hub import (  # noqa: F401
    dinov2_vitb14,
    dinov2_vitb14_lc,
    dinov2_vitb14_reg,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg,
    dinov2_vitl14_reg_lc,
    dinov2_vits14,
    dinov2_vits14_lc,
    dinov2_vits14_reg,
    dinov2_vits14_reg_lc,
)

dependencies = ["torch"]
