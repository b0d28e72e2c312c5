"""Hugging Face Transformers folders (config.json + model.safetensors) to and from our backbone.

Export writes the key layout of the published ``facebook/dinov2-*`` folders (``embeddings.*``,
``encoder.layer.<i>.attention.attention.query`` ..., ``mlp.weights_in`` for SwiGLU), which every
Transformers release with DINOv2 loads: ``Dinov2Model`` for models without registers,
``Dinov2WithRegistersModel`` for models with registers. Import reads the same layout, the newer
in-memory names (``attention.q_proj``, ``mlp.gate_proj`` ...) and a ``dinov2.`` base-model prefix
(classification checkpoints; their head is dropped), with safetensors only: no Transformers needed.

What Transformers cannot hold is refused by name: a block without LayerScale (``init_values=None``),
attention-output or FFN layers without bias, and a fractional ``mlp_ratio`` (its config takes an int).
One thing it holds differently: the position-embedding resize at resolutions other than the training
one. ``Dinov2Model`` resizes to the new grid without our 0.1 offset (the released non-register models use
it) and without antialias; ``Dinov2WithRegistersModel`` resizes with antialias and no offset. At the
training resolution both match ours exactly; elsewhere they match only where our settings agree
(``hf_interpolation_matches``). Our settings (and the name of the SwiGLU variant) are kept in config.json
under ``dinov2_backbone``, so importing our own export gives back the same model and config.
"""

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from dinov2.atomic import output_folder, write_json
from dinov2.hub.checkpoints import CheckpointError, load_state_dict_strict
from dinov2.models import DinoVisionTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# our config fields that Transformers has no field for, kept so that importing our own export is exact
EXTRA_KEY = "dinov2_backbone"
LAYER_NORM_EPS = 1e-6  # every LayerNorm of DinoVisionTransformer
MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
# Max abs difference allowed between Transformers' forward and ours (normalised tokens).
TOLERANCE = 1e-4

# our key -> Transformers key, per block and for the embeddings (qkv is split separately)
_BLOCK_KEYS = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_KEYS = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
# Transformers 5 in-memory names -> the published layout
_NEW_NAMES = {
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
    ".mlp.down_proj.": ".mlp.weights_out.",
}


def require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ValueError("the Hugging Face check needs transformers: pip install transformers (or '.[dev]')") from None


def hf_model_class_name(config: Mapping) -> str:
    return MODEL_TYPES["dinov2_with_registers" if config["num_register_tokens"] else "dinov2"]


def hf_interpolation_matches(config: Mapping) -> bool:
    """Whether Transformers resizes the position embedding as we do at resolutions other than training."""
    antialias_expected = bool(config["num_register_tokens"])
    return config["interpolate_offset"] == 0 and bool(config["interpolate_antialias"]) == antialias_expected


def to_hf_config(config: Mapping) -> dict:
    """Our architecture (``DinoVisionTransformer.config``) as a Transformers config.json; ValueError naming
    the field when Transformers cannot hold it."""
    if config["init_values"] is None:
        raise ValueError("init_values=None (no LayerScale): Transformers' DINOv2 blocks always have LayerScale")
    for field in ("proj_bias", "ffn_bias"):
        if not config[field]:
            raise ValueError(f"{field}=False: Transformers' DINOv2 always has this bias")
    if float(config["mlp_ratio"]) != int(config["mlp_ratio"]):
        raise ValueError(f"mlp_ratio={config['mlp_ratio']}: Transformers' DINOv2 config takes an integer mlp_ratio")
    registers = config["num_register_tokens"]
    hf = {
        "architectures": [hf_model_class_name(config)],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": config["embed_dim"],
        "num_hidden_layers": config["depth"],
        "num_attention_heads": config["num_heads"],
        "mlp_ratio": int(config["mlp_ratio"]),
        "hidden_act": "gelu",
        "use_swiglu_ffn": config["ffn_layer"] in ("swiglu", "swiglufused"),
        "layerscale_value": config["init_values"],
        "image_size": config["img_size"],
        "patch_size": config["patch_size"],
        "num_channels": config["in_chans"],
        "qkv_bias": config["qkv_bias"],
        "layer_norm_eps": LAYER_NORM_EPS,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "dtype": "float32",
        EXTRA_KEY: {
            "ffn_layer": config["ffn_layer"],
            "interpolate_offset": config["interpolate_offset"],
            "interpolate_antialias": config["interpolate_antialias"],
        },
    }
    if registers:
        hf["num_register_tokens"] = registers
    else:
        hf["use_mask_token"] = True
    return hf


def _square(hf: Mapping, field: str, default: int) -> int:
    value = hf.get(field, default)
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{field}={value}: this backbone needs a square {field}")
        value = value[0]
    return int(value)


def from_hf_config(hf: Mapping) -> dict:
    """A Transformers DINOv2 config.json as ``DinoVisionTransformer`` arguments; ValueError naming the
    field when our backbone cannot hold it."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    registers = int(hf.get("num_register_tokens", 4)) if model_type == "dinov2_with_registers" else 0
    swiglu = bool(hf.get("use_swiglu_ffn", False))
    eps = float(hf.get("layer_norm_eps", 1e-6))
    if abs(eps - LAYER_NORM_EPS) > 1e-12:
        raise ValueError(f"layer_norm_eps={eps}: this backbone's LayerNorms use {LAYER_NORM_EPS}")
    if not swiglu and hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act={hf.get('hidden_act')!r}: this backbone's MLP uses gelu")
    hidden, heads = int(hf.get("hidden_size", 768)), int(hf.get("num_attention_heads", 12))
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"head_dim={hf['head_dim']}: this backbone uses hidden_size / num_attention_heads")
    layerscale = hf.get("layerscale_value", 1.0)
    # Transformers' own resize (see the module docstring) unless the folder records ours
    extra = {"interpolate_offset": 0.0, "interpolate_antialias": bool(registers), **(hf.get(EXTRA_KEY) or {})}
    ffn_layer = "swiglufused" if swiglu else "mlp"
    if swiglu and extra.get("ffn_layer") in ("swiglu", "swiglufused"):
        ffn_layer = extra["ffn_layer"]
    return {
        "img_size": _square(hf, "image_size", 224),
        "patch_size": _square(hf, "patch_size", 14),
        "in_chans": int(hf.get("num_channels", 3)),
        "embed_dim": hidden,
        "depth": int(hf.get("num_hidden_layers", 12)),
        "num_heads": heads,
        "mlp_ratio": float(hf.get("mlp_ratio", 4)),
        "qkv_bias": bool(hf.get("qkv_bias", True)),
        "proj_bias": True,
        "ffn_bias": True,
        "ffn_layer": ffn_layer,
        "init_values": float(layerscale) if layerscale else 1.0,
        "num_register_tokens": registers,
        "interpolate_offset": float(extra["interpolate_offset"]),
        "interpolate_antialias": bool(extra["interpolate_antialias"]),
    }


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released-hub keys -> the published Transformers layout (qkv split into query, key, value)."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        block = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key)
        if block is None:
            module, _, leaf = key.rpartition(".")
            name = _TOP_KEYS.get(module or leaf)
            if name is None:
                raise CheckpointError(f"no Transformers name for {key}")
            converted[f"{name}.{leaf}" if module else name] = value
            continue
        index, module, leaf = block.groups()
        prefix = f"encoder.layer.{index}"
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                converted[f"{prefix}.attention.attention.{name}.{leaf}"] = part
        elif f"{module}.{leaf}" in _BLOCK_KEYS:  # LayerScale: ls1.gamma
            converted[f"{prefix}.{_BLOCK_KEYS[f'{module}.{leaf}']}"] = value
        elif module in _BLOCK_KEYS:
            converted[f"{prefix}.{_BLOCK_KEYS[module]}.{leaf}"] = value
        else:
            raise CheckpointError(f"no Transformers name for {key}")
    return {key: value.detach().cpu().contiguous() for key, value in converted.items()}


def _published_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Transformers 5 in-memory names (q_proj, gate_proj/up_proj ...) -> the published layout."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for new, old in _NEW_NAMES.items():
            key = key.replace(new, old)
        converted[key] = value
    for key in [key for key in converted if ".mlp.gate_proj." in key]:
        up = key.replace(".mlp.gate_proj.", ".mlp.up_proj.")
        if up in converted:
            fused = key.replace(".mlp.gate_proj.", ".mlp.weights_in.")
            converted[fused] = torch.cat((converted.pop(key), converted.pop(up)), dim=0)
    return converted


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Transformers DINOv2 state dict -> released-hub keys. A ``dinov2.`` / ``dinov2_with_registers.``
    base-model prefix is stripped and what lies outside it (a classifier) is dropped."""
    for prefix in ("dinov2_with_registers.", "dinov2."):
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {
                key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)
            }
            break
    source = _published_layout(state_dict)
    top = {name: ours for ours, name in _TOP_KEYS.items()}
    block_names = {name: ours for ours, name in _BLOCK_KEYS.items()}
    converted: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        layer = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", key)
        if layer is None:
            module, _, leaf = key.rpartition(".")
            if key in top:  # parameters without a leaf name: cls_token, pos_embed ...
                converted[top[key]] = value
            elif module in top:
                converted[f"{top[module]}.{leaf}"] = value
            else:
                converted[key] = value  # reported as unexpected by the strict load
            continue
        index, rest = layer.groups()
        attention = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if attention is not None:
            qkv.setdefault((index, attention.group(2)), {})[attention.group(1)] = value
            continue
        module, _, leaf = rest.rpartition(".")
        if rest in block_names:  # layer_scale1.lambda1
            converted[f"blocks.{index}.{block_names[rest]}"] = value
        elif module in block_names:
            converted[f"blocks.{index}.{block_names[module]}.{leaf}"] = value
        else:
            converted[f"blocks.{index}.{rest}"] = value
    for (index, leaf), parts in qkv.items():
        missing = [name for name in ("query", "key", "value") if name not in parts]
        if missing:
            raise CheckpointError(f"encoder.layer.{index}.attention.attention.{missing[0]}.{leaf} is missing")
        converted[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return converted


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_hf_folder(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a Transformers folder with safetensors weights (one file or shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Hugging Face folder not found: {folder}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error})") from error
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text()).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise CheckpointError(
            f"{folder} has no {WEIGHTS_FILE}: only safetensors weights are read (re-save the model with "
            "save_pretrained(folder, safe_serialization=True))"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state_dict.update(load_file(str(path)))
        except Exception as error:  # safetensors raises several types for truncated files
            raise CheckpointError(f"cannot read {path}: it is corrupted or not a safetensors file ({error})") from error
    return config, state_dict


def load_hf_backbone(folder: str | Path, **overrides) -> DinoVisionTransformer:
    """Our backbone, strictly loaded from a Transformers DINOv2 folder (config.json + safetensors)."""
    hf_config, state_dict = read_hf_folder(folder)
    try:
        config = from_hf_config(hf_config)
    except ValueError as error:
        raise CheckpointError(f"{Path(folder) / CONFIG_FILE}: {error}") from None
    model = DinoVisionTransformer(**{**config, **overrides})
    converted = from_hf_state_dict(state_dict)
    if "mask_token" not in converted:  # use_mask_token=False: inference never reads it
        converted["mask_token"] = torch.zeros_like(model.mask_token)
    load_state_dict_strict(model, converted, str(folder))
    return model


def _prepare_folder(folder: Path) -> None:
    """Refuse to write over anything but an empty folder or an earlier export (config + weights only)."""
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        foreign = sorted(path.name for path in folder.iterdir() if path.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            raise ValueError(f"{folder} holds other files ({', '.join(foreign[:3])}); choose an empty or new folder")


def save_hf(model: DinoVisionTransformer, folder: str | Path) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` for ``from_pretrained(folder)``.

    Both files are written in a hidden sibling folder that replaces ``folder`` when complete, so an
    interrupted export never leaves a config beside weights it does not describe.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    config = to_hf_config(model.config)
    state_dict = to_hf_state_dict(model.state_dict())
    _prepare_folder(folder)
    with output_folder(folder) as staging:
        save_file(state_dict, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(config, staging / CONFIG_FILE)
    return folder


def load_hf_model(folder: str | Path):
    """``Dinov2Model`` / ``Dinov2WithRegistersModel`` from ``folder``, refusing any missing, unexpected or
    misshaped weight (``from_pretrained`` only warns)."""
    require_transformers()
    import transformers
    from transformers.utils import logging as hf_logging

    config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    model_class = getattr(transformers, MODEL_TYPES[config["model_type"]])
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(str(folder), output_loading_info=True, local_files_only=True)
    finally:
        if progress_bar:
            hf_logging.enable_progress_bar()
    problems = {name: sorted(info.get(name) or []) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {name: keys for name, keys in problems.items() if keys}
    if problems:
        raise CheckpointError(f"transformers did not load {folder} strictly: {problems}")
    return model.eval()


def parity_inputs(model: DinoVisionTransformer, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images at the training resolution (batch 2) and at a larger non-square one (batch 1)."""
    generator = torch.Generator().manual_seed(seed)
    patch, side = model.patch_size, model.patch_embed.grid_size
    channels = model.patch_embed.proj.in_channels
    return {
        "train": torch.randn(2, channels, side * patch, side * patch, generator=generator),
        "resized": torch.randn(1, channels, (side + 2) * patch, (side + 3) * patch, generator=generator),
    }


def check_hf_parity(model: DinoVisionTransformer, folder: str | Path) -> dict[str, float]:
    """Max abs difference between Transformers' ``last_hidden_state`` / ``pooler_output`` and our normed
    tokens / CLS token, at the training resolution (``*_train``) and at a resized one (``*_resized``).

    The resized figures are exact only where ``hf_interpolation_matches(model.config)``.
    """
    hf_model = load_hf_model(folder)
    figures: dict[str, float] = {}
    model_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, images in parity_inputs(model).items():
                ours = model.forward_features(images)
                output = hf_model(pixel_values=images)
                tokens = model.norm(ours["x_prenorm"])
                figures[f"last_hidden_state_{name}"] = (output.last_hidden_state - tokens).abs().max().item()
                figures[f"pooler_output_{name}"] = (output.pooler_output - ours["x_norm_clstoken"]).abs().max().item()
    finally:
        model.train(model_training)
    return figures
