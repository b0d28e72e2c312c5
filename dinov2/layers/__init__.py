"""Building blocks of the DINOv2 vision transformer, one small module each."""

from dinov2.layers.attention import ATTENTION_BACKENDS, Attention, xformers_usable
from dinov2.layers.block import Block
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp, SwiGLUFFNFused
from dinov2.layers.patch_embed import PatchEmbed

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFNFused",
    "xformers_usable",
]
