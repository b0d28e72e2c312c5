"""torch.hub-style entry points (``dinov2_vits14`` ...), checkpoint loading and export."""

from collections.abc import Callable

from torch import nn

from dinov2.hub import backbones, classifiers
from dinov2.hub.backbones import (
    Weights,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
from dinov2.hub.checkpoints import CheckpointError, load_backbone_weights, read_state_dict, to_backbone_keys
from dinov2.hub.classifiers import (
    dinov2_vitb14_lc,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg_lc,
    dinov2_vits14_lc,
    dinov2_vits14_reg_lc,
)
from dinov2.hub.export import load_backbone, save_backbone, save_timm, to_timm_state_dict

ENTRY_POINTS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(module, name)
    for module in (backbones, classifiers)
    for name in dir(module)
    if name.startswith("dinov2_") and callable(getattr(module, name))
}


def create(name: str, **kwargs) -> nn.Module:
    """Build a model by its torch.hub name, e.g. ``create("dinov2_vits14", pretrained=False)``."""
    if name not in ENTRY_POINTS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(ENTRY_POINTS))}")
    return ENTRY_POINTS[name](**kwargs)


__all__ = [
    "ENTRY_POINTS",
    "CheckpointError",
    "Weights",
    "create",
    "load_backbone",
    "load_backbone_weights",
    "read_state_dict",
    "save_backbone",
    "save_timm",
    "to_backbone_keys",
    "to_timm_state_dict",
    "dinov2_vitb14",
    "dinov2_vitb14_lc",
    "dinov2_vitb14_reg",
    "dinov2_vitb14_reg_lc",
    "dinov2_vitg14",
    "dinov2_vitg14_lc",
    "dinov2_vitg14_reg",
    "dinov2_vitg14_reg_lc",
    "dinov2_vitl14",
    "dinov2_vitl14_lc",
    "dinov2_vitl14_reg",
    "dinov2_vitl14_reg_lc",
    "dinov2_vits14",
    "dinov2_vits14_lc",
    "dinov2_vits14_reg",
    "dinov2_vits14_reg_lc",
]
