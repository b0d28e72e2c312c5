"""Model definitions: the DINOv2 vision transformer family."""

from dinov2.models.vision_transformer import (
    ARCHITECTURES,
    DinoVisionTransformer,
    ViTArch,
    build_vit,
    interpolate_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)

__all__ = [
    "ARCHITECTURES",
    "DinoVisionTransformer",
    "ViTArch",
    "build_vit",
    "interpolate_pos_embed",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
