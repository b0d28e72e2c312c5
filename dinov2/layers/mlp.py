"""Feed-forward layers of a transformer block: GELU MLP and fused SwiGLU."""

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim: int) -> int:
    """SwiGLU keeps the FFN's parameter budget: 2/3 of the MLP width, rounded up to a multiple of 8.

    ViT-g/14: 4 * 1536 = 6144 -> 4096.
    """
    return (int(hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    """w3(silu(x1) * x2) with x1, x2 = w12(x).chunk(2): the packed layout of the released ViT-g."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


FFN_LAYERS = {"mlp": Mlp, "swiglu": SwiGLUFFNFused, "swiglufused": SwiGLUFFNFused}


def make_ffn(kind: str, dim: int, hidden_dim: int, bias: bool = True) -> nn.Module:
    if kind not in FFN_LAYERS:
        raise ValueError(f"unknown ffn_layer {kind!r}; expected one of {sorted(FFN_LAYERS)}")
    return FFN_LAYERS[kind](dim, hidden_dim, bias=bias)
