"""Image to patch tokens: one strided convolution."""

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D), row-major over the patch grid."""

    def __init__(self, img_size: int = 224, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop to e.g. {height // self.patch_size * self.patch_size}x"
                f"{width // self.patch_size * self.patch_size}"
            )
        if images.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected {self.proj.in_channels} image channels, got {images.shape[1]}")
        return self.proj(images).flatten(2).transpose(1, 2)
