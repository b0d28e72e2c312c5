"""Writing backbones for others to load: safetensors in the released-hub layout, and timm's layout.

Our safetensors files carry the architecture in their metadata (``dinov2.config``), so
``load_backbone(path)`` rebuilds the model without being told what it is. Files are written under a
temporary name and renamed when complete: an interrupted export never leaves a file that looks whole.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dinov2.atomic import write_atomically
from dinov2.hub.checkpoints import CheckpointError, load_state_dict_strict, to_backbone_keys
from dinov2.layers.mlp import swiglu_hidden_dim
from dinov2.models import DinoVisionTransformer

FORMAT_KEY = "format"
CONFIG_KEY = "dinov2.config"
BACKBONE_FORMAT = "dinov2-backbone"
TIMM_FORMAT = "timm-vit"

_TIMM_ARCH = {384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant"}


def _contiguous(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}


def save_backbone(model: DinoVisionTransformer, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Backbone weights in the released-hub key layout, with the architecture in the metadata."""
    from safetensors.torch import save_file

    header = {FORMAT_KEY: BACKBONE_FORMAT, CONFIG_KEY: json.dumps(model.config), **(metadata or {})}
    state_dict = _contiguous(model.state_dict())
    return write_atomically(path, lambda tmp: save_file(state_dict, str(tmp), metadata=header))


def is_backbone_file(source: str | Path) -> bool:
    """Whether ``source`` names a backbone that holds its architecture: a ``.safetensors`` from
    ``save_backbone`` (or a training run), or a Hugging Face DINOv2 folder."""
    from dinov2.hub.transformers import is_hf_folder

    return str(source).endswith(".safetensors") or is_hf_folder(source)


def load_backbone(path: str | Path, **overrides) -> DinoVisionTransformer:
    """Rebuild and strictly load a backbone written by ``save_backbone``, or a Hugging Face Transformers
    DINOv2 folder (config.json + safetensors, see ``dinov2.hub.transformers``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        from dinov2.hub.transformers import load_hf_backbone

        return load_hf_backbone(path, **overrides)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        state_dict = load_file(str(path))
    except Exception as error:
        raise CheckpointError(f"cannot read {path}: it is corrupted or not a safetensors file ({error})") from error
    if header.get(FORMAT_KEY) != BACKBONE_FORMAT or CONFIG_KEY not in header:
        raise CheckpointError(
            f"{path} has no DINOv2 architecture metadata (format {header.get(FORMAT_KEY)!r}); "
            "load it into a model you build, e.g. dinov2.hub.dinov2_vits14(weights=path)"
        )
    model = DinoVisionTransformer(**{**json.loads(header[CONFIG_KEY]), **overrides})
    load_state_dict_strict(model, to_backbone_keys(state_dict), str(path))
    return model


def timm_model_name(config: Mapping) -> str:
    """The timm model with the same layout, e.g. vit_small_patch14_reg4_dinov2.

    Create it with ``timm_model_kwargs(config)``, which sets size, patch and width where they differ.
    """
    if config["ffn_layer"] in ("swiglu", "swiglufused"):
        family = "vit_giant"
    else:
        family = _TIMM_ARCH.get(config["embed_dim"], "vit_small")
    registers = f"_reg{config['num_register_tokens']}" if config["num_register_tokens"] else ""
    return f"{family}_patch14{registers}_dinov2"


def timm_model_kwargs(config: Mapping) -> dict:
    kwargs = {
        "img_size": config["img_size"],
        "patch_size": config["patch_size"],
        "embed_dim": config["embed_dim"],
        "depth": config["depth"],
        "num_heads": config["num_heads"],
        "num_classes": 0,
    }
    if config["ffn_layer"] in ("swiglu", "swiglufused"):
        # timm sizes its packed SwiGLU as int(dim * 5.33334); ours rounds 2/3 of the MLP width up to 8.
        packed = 2 * swiglu_hidden_dim(int(config["embed_dim"] * config["mlp_ratio"]))
        if packed != int(config["embed_dim"] * 2.66667 * 2):
            raise CheckpointError(f"timm cannot build the SwiGLU width {packed} of a {config['embed_dim']}-wide model")
    else:
        kwargs["mlp_ratio"] = config["mlp_ratio"]
    return kwargs


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released-hub keys -> timm VisionTransformer keys.

    timm keeps no mask token; register models there put no position embedding on CLS, so the CLS
    position embedding is folded into the CLS token; the packed SwiGLU is ``mlp.fc1``/``mlp.fc2``.
    """
    source = dict(to_backbone_keys(state_dict))
    source.pop("mask_token", None)
    converted: dict[str, torch.Tensor] = {}
    if "register_tokens" in source:
        converted["reg_token"] = source.pop("register_tokens")
        pos_embed = source.pop("pos_embed")
        converted["cls_token"] = source.pop("cls_token") + pos_embed[:, :1]
        converted["pos_embed"] = pos_embed[:, 1:]
    for key, value in source.items():
        key = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key)
        converted[re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key)] = value
    return converted


def save_timm(model: DinoVisionTransformer, path: str | Path) -> Path:
    from safetensors.torch import save_file

    header = {
        FORMAT_KEY: TIMM_FORMAT,
        "timm.model_name": timm_model_name(model.config),
        "timm.model_kwargs": json.dumps(timm_model_kwargs(model.config)),
    }
    state_dict = _contiguous(to_timm_state_dict(model.state_dict()))
    return write_atomically(path, lambda tmp: save_file(state_dict, str(tmp), metadata=header))


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
