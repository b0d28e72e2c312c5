"""PCA of patch features as an RGB picture, as in the DINOv2 paper's figure 1."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def patch_pca_picture(patch_tokens: torch.Tensor, grid: int, cell: int = 112) -> Image.Image:
    """First three principal components of all patch features, as RGB, one tile per image."""
    batch, n_patches, dim = patch_tokens.shape
    flat = patch_tokens.reshape(-1, dim).float()
    flat = flat - flat.mean(dim=0)
    _, _, components = torch.linalg.svd(flat, full_matrices=False)
    projected = flat @ components[:3].T
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    rgb = ((projected - low) / (high - low).clamp_min(1e-8)).reshape(batch, grid, grid, 3)
    tiles = F.interpolate(rgb.permute(0, 3, 1, 2), size=(cell, cell), mode="nearest")
    row = torch.cat(list(tiles), dim=2)  # 3 x cell x (batch*cell)
    return Image.fromarray((row.permute(1, 2, 0).numpy() * 255).astype(np.uint8))
