"""torch.hub entry points for the DINOv2 backbones, with the released names and weights layout."""

from enum import Enum
from pathlib import Path

from dinov2.hub.checkpoints import CheckpointError, load_backbone_weights
from dinov2.models import DinoVisionTransformer, build_vit

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


class Weights(Enum):
    LVD142M = "LVD142M"


def model_name(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    """'vit_small', 14, 4 -> 'dinov2_vits14_reg4' (the released file names)."""
    compact = arch_name.replace("_", "")[:4]
    registers = f"_reg{num_register_tokens}" if num_register_tokens else ""
    return f"dinov2_{compact}{patch_size}{registers}"


def released_backbone_url(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    base = model_name(arch_name, patch_size)
    return f"{DINOV2_BASE_URL}/{base}/{model_name(arch_name, patch_size, num_register_tokens)}_pretrain.pth"


def weights_source(weights: Weights | str | Path, official_url: str, enum: type[Enum]) -> str:
    """An enum member (or its name) means the official URL; anything else is a path or URL."""
    if isinstance(weights, enum):
        return official_url
    if isinstance(weights, str) and weights in enum.__members__:
        return official_url
    if isinstance(weights, (str, Path)):
        return str(weights)
    raise CheckpointError(f"weights must be one of {list(enum.__members__)}, a path or a URL; got {weights!r}")


def make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    weights: Weights | str | Path = Weights.LVD142M,
    **kwargs,
) -> DinoVisionTransformer:
    model = build_vit(
        arch_name,
        img_size=img_size,
        patch_size=patch_size,
        init_values=init_values,
        ffn_layer=ffn_layer,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
        **kwargs,
    )
    if pretrained:
        source = weights_source(weights, released_backbone_url(arch_name, patch_size, num_register_tokens), Weights)
        load_backbone_weights(model, source)
    return model


# Models with registers were trained with the antialiased, offset-free position-embedding resize.
REGISTER_OPTIONS = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}
# ViT-g's feed-forward is the fused SwiGLU; the others use the GELU MLP.
ARCH_OPTIONS = {"vit_small": {}, "vit_base": {}, "vit_large": {}, "vit_giant2": {"ffn_layer": "swiglufused"}}
ARCH_TITLES = {
    "vit_small": "ViT-S/14 (21M)",
    "vit_base": "ViT-B/14 (86M)",
    "vit_large": "ViT-L/14 (300M)",
    "vit_giant2": "ViT-g/14 (1.1B)",
}


def hub_options(arch_name: str, registers: bool) -> dict:
    """The constructor options of a released model: its FFN and, with registers, their settings."""
    return {**ARCH_OPTIONS[arch_name], **(REGISTER_OPTIONS if registers else {})}


def _backbone_entry(arch_name: str, registers: bool):
    def entry(*, pretrained: bool = True, weights: Weights | str | Path = Weights.LVD142M, **kwargs):
        return make_dinov2_model(
            arch_name=arch_name,
            pretrained=pretrained,
            weights=weights,
            **{**hub_options(arch_name, registers), **kwargs},
        )

    entry.__name__ = entry.__qualname__ = model_name(arch_name, 14) + ("_reg" if registers else "")
    entry.__doc__ = (
        f"DINOv2 {ARCH_TITLES[arch_name]}{' with 4 register tokens' if registers else ''}; with pretrained=True "
        "the released LVD-142M weights, or weights from a path / file:// / http(s):// URL given as `weights`."
    )
    return entry


dinov2_vits14 = _backbone_entry("vit_small", registers=False)
dinov2_vitb14 = _backbone_entry("vit_base", registers=False)
dinov2_vitl14 = _backbone_entry("vit_large", registers=False)
dinov2_vitg14 = _backbone_entry("vit_giant2", registers=False)
dinov2_vits14_reg = _backbone_entry("vit_small", registers=True)
dinov2_vitb14_reg = _backbone_entry("vit_base", registers=True)
dinov2_vitl14_reg = _backbone_entry("vit_large", registers=True)
dinov2_vitg14_reg = _backbone_entry("vit_giant2", registers=True)
