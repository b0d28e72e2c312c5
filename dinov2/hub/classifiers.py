"""Linear ImageNet-1k classifiers on top of the DINOv2 backbones (the released ``*_lc`` models)."""

from enum import Enum
from pathlib import Path

import torch
from torch import nn

from dinov2.hub.backbones import (
    ARCH_TITLES,
    DINOV2_BASE_URL,
    hub_options,
    make_dinov2_model,
    model_name,
    weights_source,
)
from dinov2.hub.backbones import (
    Weights as BackboneWeights,
)
from dinov2.hub.checkpoints import CheckpointError, load_state_dict_strict, read_state_dict


class Weights(Enum):
    IMAGENET1K = "IMAGENET1K"


def released_head_url(arch_name: str, patch_size: int, num_register_tokens: int, layers: int) -> str:
    base = model_name(arch_name, patch_size)
    full = model_name(arch_name, patch_size, num_register_tokens)
    layers_suffix = "4" if layers == 4 else ""
    return f"{DINOV2_BASE_URL}/{base}/{full}_linear{layers_suffix}_head.pth"


def linear_head_input(backbone: nn.Module, images: torch.Tensor, layers: int) -> torch.Tensor:
    """Concat of the CLS tokens of the last ``layers`` blocks and the mean last-block patch token."""
    if layers == 1:
        features = backbone.forward_features(images)
        return torch.cat([features["x_norm_clstoken"], features["x_norm_patchtokens"].mean(dim=1)], dim=1)
    outputs = backbone.get_intermediate_layers(images, n=layers, return_class_token=True)
    class_tokens = [class_token for _, class_token in outputs]
    return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=1)


class LinearClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, linear_head: nn.Linear, layers: int = 4):
        super().__init__()
        self.backbone = backbone
        self.linear_head = linear_head
        self.layers = layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear_head(linear_head_input(self.backbone, images, self.layers))


def make_dinov2_linear_classifier(
    *,
    arch_name: str,
    layers: int = 4,
    pretrained: bool = True,
    weights: Weights | str | Path = Weights.IMAGENET1K,
    backbone_weights: BackboneWeights | str | Path = BackboneWeights.LVD142M,
    num_register_tokens: int = 0,
    num_classes: int = 1000,
    **kwargs,
) -> LinearClassifier:
    """``weights`` selects the head (IMAGENET1K or a path/URL), ``backbone_weights`` the backbone."""
    if layers not in (1, 4):
        raise ValueError(f"layers must be 1 or 4 (the released heads), got {layers}")
    backbone = make_dinov2_model(
        arch_name=arch_name,
        pretrained=pretrained,
        weights=backbone_weights,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )
    linear_head = nn.Linear((1 + layers) * backbone.embed_dim, num_classes)
    if pretrained:
        official = released_head_url(arch_name, backbone.patch_size, num_register_tokens, layers)
        source = weights_source(weights, official, Weights)
        state_dict = read_state_dict(source)
        if set(state_dict) != {"weight", "bias"}:
            raise CheckpointError(
                f"{source} is not a linear head: expected keys weight and bias, got {sorted(state_dict)[:6]}"
            )
        load_state_dict_strict(linear_head, state_dict, source)
    return LinearClassifier(backbone, linear_head, layers)


def _classifier_entry(arch_name: str, registers: bool):
    def entry(
        *, layers: int = 4, pretrained: bool = True, weights: Weights | str | Path = Weights.IMAGENET1K, **kwargs
    ):
        return make_dinov2_linear_classifier(
            arch_name=arch_name,
            layers=layers,
            pretrained=pretrained,
            weights=weights,
            **{**hub_options(arch_name, registers), **kwargs},
        )

    entry.__name__ = entry.__qualname__ = model_name(arch_name, 14) + ("_reg" if registers else "") + "_lc"
    entry.__doc__ = (
        f"Linear ImageNet-1k classifier (over the last 1 or 4 blocks) on DINOv2 {ARCH_TITLES[arch_name]}"
        f"{' with registers' if registers else ''}. `weights`: IMAGENET1K or a head path/URL; "
        "`backbone_weights`: LVD142M or a backbone path/URL."
    )
    return entry


dinov2_vits14_lc = _classifier_entry("vit_small", registers=False)
dinov2_vitb14_lc = _classifier_entry("vit_base", registers=False)
dinov2_vitl14_lc = _classifier_entry("vit_large", registers=False)
dinov2_vitg14_lc = _classifier_entry("vit_giant2", registers=False)
dinov2_vits14_reg_lc = _classifier_entry("vit_small", registers=True)
dinov2_vitb14_reg_lc = _classifier_entry("vit_base", registers=True)
dinov2_vitl14_reg_lc = _classifier_entry("vit_large", registers=True)
dinov2_vitg14_reg_lc = _classifier_entry("vit_giant2", registers=True)
