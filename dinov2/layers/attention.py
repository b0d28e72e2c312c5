"""Multi-head self-attention with interchangeable kernels.

Backends:
- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; runs on CPU and picks the
  flash / memory-efficient kernels on GPU.
- ``math``: the textbook softmax(q k^T / sqrt(d)) v in float32; the reference the others are tested
  against.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, used only where xformers imports AND its
  kernels run on the tensors' device and dtype (checked once per device/dtype with a tiny call).
  Otherwise the module falls back to ``sdpa`` without a word, since a wheel that imports but has no
  kernels for this torch build is common.
"""

import logging
import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "math", "xformers")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: (B, heads, N, head_dim) -> (B, heads, N, head_dim)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * scale, dim=-1)
    return (weights @ v.float()).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _xformers_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    # xformers wants (B, N, heads, head_dim)
    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@cache
def xformers_usable(device_type: str, dtype: torch.dtype) -> bool:
    """True when xformers imports and its kernel gives the right answer on this device and dtype."""
    try:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 16, 64, generator=generator).to(device_type, dtype) for _ in range(3))
        expected = math_attention(q, k, v).float()
        got = _xformers_call(q, k, v).float()
        usable = bool(torch.allclose(got, expected, atol=2e-2, rtol=2e-2))
    except Exception as error:  # ImportError, missing kernels (NotImplementedError), CUDA errors
        logger.info("xformers attention unavailable on %s/%s (%s); using SDPA", device_type, dtype, error)
        return False
    if not usable:
        logger.warning("xformers attention gives wrong results on %s/%s; using SDPA", device_type, dtype)
    return usable


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "xformers" and xformers_usable(q.device.type, q.dtype):
        return _xformers_call(q, k, v)
    return sdpa_attention(q, k, v)


def check_attention_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    return backend


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: str = "sdpa",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_attention_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = attend(q, k, v, self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
