"""The DINOv2 vision transformer (ViT-S/B/L/g), with the released checkpoints' exact parameter layout.

Token order: patch embed -> masked patches replaced by ``mask_token`` -> CLS prepended -> position
embedding added (interpolated to the input's patch grid) -> register tokens inserted between CLS and
patches (registers get no position embedding).
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from dinov2.layers import Block, PatchEmbed


@dataclass(frozen=True)
class ViTArch:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES: dict[str, ViTArch] = {
    "vit_small": ViTArch(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTArch(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTArch(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": ViTArch(embed_dim=1536, depth=40, num_heads=24),
}


def interpolate_pos_embed(
    patch_pos_embed: torch.Tensor,
    grid_hw: tuple[int, int],
    interpolate_offset: float,
    interpolate_antialias: bool,
) -> torch.Tensor:
    """Bicubic resize of (1, M*M, D) patch position embeddings to (1, h*w, D).

    With ``interpolate_offset`` > 0 (models without registers) the size is given as the scale factor
    ``(h + offset) / M``, which is what the released checkpoints were trained with; the offset
    avoids a floor() landing one short. With offset 0 (register models) the size is given directly.
    """
    n_patches, dim = patch_pos_embed.shape[1:]
    side = int(math.sqrt(n_patches))
    if side * side != n_patches:
        raise ValueError(f"pos_embed holds {n_patches} patch positions, not a square grid")
    grid = patch_pos_embed.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    height, width = grid_hw
    if interpolate_offset:
        size_kwargs: dict[str, Any] = {
            "scale_factor": ((height + interpolate_offset) / side, (width + interpolate_offset) / side)
        }
    else:
        size_kwargs = {"size": (height, width)}
    grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **size_kwargs)
    if grid.shape[-2:] != (height, width):
        raise RuntimeError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, wanted {(height, width)}")
    return grid.permute(0, 2, 3, 1).reshape(1, height * width, dim)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "sdpa",
    ):
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        # Everything needed to rebuild this architecture; written beside exported weights.
        self.config = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "proj_bias": proj_bias,
            "ffn_bias": ffn_bias,
            "ffn_layer": ffn_layer,
            "init_values": init_values,
            "num_register_tokens": num_register_tokens,
            "interpolate_antialias": interpolate_antialias,
            "interpolate_offset": interpolate_offset,
        }
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                ffn_layer=ffn_layer,
                init_values=init_values,
                drop_path=rate,
                attn_backend=attn_backend,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def position_embedding(self, grid_hw: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        n_patches = self.pos_embed.shape[1] - 1
        if grid_hw[0] * grid_hw[1] == n_patches and grid_hw[0] == grid_hw[1]:
            return self.pos_embed.to(dtype)
        patch_pos = interpolate_pos_embed(
            self.pos_embed[:, 1:], grid_hw, self.interpolate_offset, self.interpolate_antialias
        )
        return torch.cat((self.pos_embed[:, :1].float(), patch_pos), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(images)
        batch, n_patches = x.shape[:2]
        if masks is not None:
            if masks.shape != (batch, n_patches):
                raise ValueError(
                    f"masks must have shape {(batch, n_patches)} (batch, patches), got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1).to(x.dtype), x), dim=1)
        grid_hw = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = x + self.position_embedding(grid_hw, x.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1).to(x.dtype)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def _split_tokens(self, x_prenorm: torch.Tensor, masks: torch.Tensor | None) -> dict[str, Any]:
        x_norm = self.norm(x_prenorm)
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : self.num_register_tokens + 1],
            "x_norm_patchtokens": x_norm[:, self.num_register_tokens + 1 :],
            "x_prenorm": x_prenorm,
            "masks": masks,
        }

    def forward_features(
        self,
        x: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One image batch -> dict of token groups; a list of crop batches -> a list of such dicts."""
        if isinstance(x, list):
            masks_list = masks if masks is not None else [None] * len(x)
            if len(masks_list) != len(x):
                raise ValueError(f"got {len(x)} crop batches but {len(masks_list)} masks")
            tokens = [self.prepare_tokens_with_masks(crops, m) for crops, m in zip(x, masks_list, strict=True)]
            for block in self.blocks:
                tokens = block(tokens)
            return [self._split_tokens(t, m) for t, m in zip(tokens, masks_list, strict=True)]
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._split_tokens(tokens, masks)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the blocks with these indices (sequence).

        Each output is the patch tokens (B, N, D), or (B, D, h, w) with ``reshape``; with
        ``return_class_token`` each is a (patch_tokens, class_token) pair.
        """
        wanted = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else list(n)
        bad = [i for i in wanted if not 0 <= i < self.n_blocks]
        if bad or len(wanted) == 0:
            raise ValueError(f"block indices {list(wanted)} out of range for a model with {self.n_blocks} blocks")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch = x.shape[0]
            grid_h, grid_w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patch_tokens = [
                out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for out in patch_tokens
            ]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens, strict=True))
        return tuple(patch_tokens)

    def forward(self, x, masks=None, is_training: bool = False):
        features = self.forward_features(x, masks)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])


def build_vit(arch_name: str, **kwargs) -> DinoVisionTransformer:
    """Build a named architecture (vit_small, vit_base, vit_large, vit_giant2) with extra options."""
    if arch_name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch_name!r}; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[arch_name]
    for fixed in ("embed_dim", "depth", "num_heads"):
        if fixed in kwargs:
            raise ValueError(f"{fixed} is fixed by the architecture {arch_name}; build DinoVisionTransformer directly")
    kwargs.setdefault("mlp_ratio", arch.mlp_ratio)
    return DinoVisionTransformer(embed_dim=arch.embed_dim, depth=arch.depth, num_heads=arch.num_heads, **kwargs)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_small", patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_base", patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return build_vit("vit_large", patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g as DINOv2 uses it: width 1536 and 24 heads, so 64 dims per head."""
    return build_vit("vit_giant2", patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs)
