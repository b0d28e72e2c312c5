"""Pre-norm transformer block with LayerScale and stochastic depth."""

from collections.abc import Callable

import torch
from torch import nn

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import add_residual_on_kept_samples, drop_path
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import make_ffn

# Below this rate, computing the branch for all samples and masking is cheaper than gathering.
KEPT_SAMPLES_MIN_RATE = 0.1


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: str = "mlp",
        init_values: float | None = None,
        drop_path: float = 0.0,
        attn_backend: str = "sdpa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, backend=attn_backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = make_ffn(ffn_layer, dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path_rate = drop_path

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _add_residual(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        rate = self.drop_path_rate if self.training else 0.0
        if rate == 0.0:
            return x + branch(x)
        if rate > KEPT_SAMPLES_MIN_RATE:
            return add_residual_on_kept_samples(x, branch, rate)
        return x + drop_path(branch(x), rate)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        # Crops of different sizes have different token counts: run them one after the other.
        if isinstance(x, list):
            return [self.forward(crop_tokens) for crop_tokens in x]
        x = self._add_residual(x, self.attn_branch)
        return self._add_residual(x, self.ffn_branch)
