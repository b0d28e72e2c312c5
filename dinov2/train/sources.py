"""Trained backbones to start from: where they come from, what they are, and their DINO/iBOT heads.

A distillation teacher (``distillation.teacher``) and the backbone a pretraining run continues from
(``init.source``) are the same kinds of source:
- a pretraining run's export folder, ``RUN/teacher/`` (``backbone.safetensors`` + ``heads.safetensors``),
  or the ``backbone.safetensors`` inside it (its ``heads.safetensors`` sibling is used when present);
- any ``.safetensors`` written by ``dinov2 export`` (architecture in its metadata, no heads);
- a Hugging Face DINOv2 folder (``config.json`` + ``model.safetensors``; no heads);
- a torch.hub name such as ``dinov2_vitg14`` with ``weights`` (the released weights by default), or a
  ``.pth`` checkpoint path or URL whose architecture is read from its tensor shapes (no heads).
``inspect_source`` reads only headers and shapes (a dry run sizes ViT-g without loading it);
``load_source`` builds the modules. The identity (source, sha256 of the files) tags every run. Errors are
one line that starts with the source's role (``teacher``, ``init.source``) and names it.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dinov2.hub.checkpoints import CheckpointError
from dinov2.layers.dino_head import DINOHead
from dinov2.models import DinoVisionTransformer

HEAD_NAMES = ("dino_head", "ibot_head")


class SourceError(ValueError):
    """A source that cannot be used: missing, not a backbone, or not the backbone (or heads) it must be."""


@dataclass
class HeadShape:
    in_dim: int
    hidden_dim: int
    bottleneck_dim: int
    n_prototypes: int
    nlayers: int

    def build(self) -> DINOHead:
        return DINOHead(
            self.in_dim, self.n_prototypes, nlayers=self.nlayers, hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
        )  # fmt: skip


@dataclass
class BackboneSource:
    source: str
    config: dict  # DinoVisionTransformer constructor arguments
    backbone_file: Path | None = None
    hub_name: str | None = None  # a torch.hub backbone, loaded with ``weights``
    weights: str | None = None
    heads_file: Path | None = None
    heads: dict[str, HeadShape] = field(default_factory=dict)

    @property
    def has_heads(self) -> bool:
        return "dino_head" in self.heads

    def grid(self, crop_size: int) -> int:
        return crop_size // self.config["patch_size"]

    def identity(self, tag: str = "dinov2.teacher") -> dict[str, str]:
        """MLflow tags: ``tag`` (the source as given) and ``<tag>_sha256`` (of its files, backbone then heads)."""
        files = [path for path in (self.backbone_file, self.heads_file) if path is not None]
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return {tag: self.source, f"{tag}_sha256": digest.hexdigest() if files else f"weights:{self.weights}"}


def _head_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, HeadShape]:
    heads = {}
    for name in HEAD_NAMES:
        prototypes = shapes.get(f"{name}.last_layer.weight_v")
        if prototypes is None:
            continue
        layers = sorted(
            (int(match.group(1)), shape)
            for key, shape in shapes.items()
            if (match := re.fullmatch(rf"{name}\.mlp\.(\d+)\.weight", key))
        )
        if not layers and f"{name}.mlp.weight" in shapes:
            layers = [(0, shapes[f"{name}.mlp.weight"])]
        if not layers:
            raise SourceError(f"{name} in the heads file has a last layer but no MLP weights")
        first, last = layers[0][1], layers[-1][1]
        heads[name] = HeadShape(
            in_dim=first[1], hidden_dim=first[0] if len(layers) > 1 else last[0], bottleneck_dim=prototypes[1],
            n_prototypes=prototypes[0], nlayers=len(layers),
        )  # fmt: skip
    return heads


def read_heads(path: Path) -> dict[str, HeadShape]:
    """The shapes of the heads in a ``heads.safetensors`` (read from its header)."""
    _, shapes = _safetensors_shapes(path, "heads")
    return _head_shapes(shapes)


def _safetensors_shapes(path: Path, role: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}, {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as error:
        raise SourceError(f"{role} {path} is not a readable safetensors file ({error})") from None


def config_from_state_dict(state_dict: dict[str, torch.Tensor], source: str, role: str = "teacher") -> dict:
    """The architecture of a released-layout backbone checkpoint, read from its tensor shapes (64 dimensions
    per attention head, as in every released model: the weights do not say)."""
    from dinov2.hub.checkpoints import to_backbone_keys

    keys = to_backbone_keys(state_dict)
    if "patch_embed.proj.weight" not in keys or "pos_embed" not in keys:
        raise SourceError(f"{role} {source} is not a ViT backbone checkpoint (no patch embedding / pos_embed)")
    embed_dim, _, patch_size, _ = keys["patch_embed.proj.weight"].shape
    depth = 1 + max(int(key.split(".")[1]) for key in keys if key.startswith("blocks."))
    registers = keys["register_tokens"].shape[1] if "register_tokens" in keys else 0
    grid = round((keys["pos_embed"].shape[1] - 1) ** 0.5)
    swiglu = "blocks.0.mlp.w12.weight" in keys
    hidden = keys["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    return {
        "img_size": grid * patch_size, "patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
        "num_heads": max(embed_dim // 64, 1), "ffn_layer": "swiglufused" if swiglu else "mlp",
        "mlp_ratio": 4.0 if swiglu else hidden / embed_dim, "num_register_tokens": registers,
        "init_values": 1.0, "interpolate_antialias": bool(registers), "interpolate_offset": 0.0 if registers else 0.1,
    }  # fmt: skip


def inspect_source(source: str, weights: str | None = None, role: str = "teacher") -> BackboneSource:
    """What the source is, from headers and shapes only; errors start with ``role`` and name the source."""
    from dinov2.hub import ENTRY_POINTS, create
    from dinov2.hub.export import BACKBONE_FORMAT, CONFIG_KEY, FORMAT_KEY

    if source in ENTRY_POINTS:
        with torch.device("meta"):
            model = create(source, pretrained=False)
        if not isinstance(model, DinoVisionTransformer):
            raise SourceError(f"{role} {source} is a classifier; name its backbone (e.g. dinov2_vitg14)")
        weights = weights or "LVD142M"
        local = Path(weights) if "://" not in weights and weights != "LVD142M" else None
        if local is not None and not local.is_file():
            raise SourceError(f"{role} {source}: weights {weights} do not exist (a checkpoint path, a URL or LVD142M)")
        config = dict(model.config)
        return BackboneSource(source=source, config=config, hub_name=source, weights=weights, backbone_file=local)
    if weights is not None:
        raise SourceError(
            f"{role} {source} is not a torch.hub name: its weights are the file itself (drop the weights)"
        )
    path = Path(source)
    if "://" not in source and not path.exists():
        raise SourceError(f"{role} {source} does not exist (expected a run's teacher/ folder, a .safetensors "
                          f"backbone, a torch.hub name such as dinov2_vitg14, or a .pth checkpoint)")  # fmt: skip
    if path.is_dir() and not (path / "backbone.safetensors").is_file():
        from dinov2.hub.transformers import from_hf_config, is_hf_folder

        if not is_hf_folder(path):
            raise SourceError(f"{role} folder {source} has no backbone.safetensors (nor a Hugging Face config.json)")
        config = from_hf_config(json.loads((path / "config.json").read_text()))
        return BackboneSource(source=source, config=config, backbone_file=path)  # a Hugging Face folder: no heads
    if path.is_dir():
        path = path / "backbone.safetensors"
    if path.suffix == ".safetensors":
        header, _ = _safetensors_shapes(path, role)
        if header.get(FORMAT_KEY) != BACKBONE_FORMAT or CONFIG_KEY not in header:
            raise SourceError(
                f"{role} {path} is not a DINOv2 backbone (no architecture metadata; "
                f"format {header.get(FORMAT_KEY)!r}): write it with `dinov2 export` or a training run"
            )
        spec = BackboneSource(source=source, config=json.loads(header[CONFIG_KEY]), backbone_file=path)
        heads_file = path.with_name("heads.safetensors")
        if heads_file.is_file():
            spec.heads_file, spec.heads = heads_file, read_heads(heads_file)
        return spec
    from dinov2.hub.checkpoints import read_state_dict

    try:
        state_dict = read_state_dict(source)
    except CheckpointError as error:
        raise SourceError(f"{role} {source}: {error}") from None
    local = Path(source) if "://" not in source else None
    return BackboneSource(source=source, config=config_from_state_dict(state_dict, source, role), backbone_file=local)


def load_heads(spec: BackboneSource) -> dict[str, DINOHead]:
    """The source's heads, built to their shapes and loaded strictly (none when it has no heads file)."""
    from safetensors.torch import load_file

    from dinov2.hub.checkpoints import load_state_dict_strict

    if spec.heads_file is None:
        return {}
    saved = load_file(str(spec.heads_file))
    heads = {}
    for name, shape in spec.heads.items():
        prefix = f"{name}."
        head_state = {key.removeprefix(prefix): value for key, value in saved.items() if key.startswith(prefix)}
        heads[name] = shape.build()
        load_state_dict_strict(heads[name], head_state, str(spec.heads_file))
    return heads


def load_source(spec: BackboneSource) -> nn.ModuleDict:
    """The source as ``ModuleDict(backbone, dino_head[, ibot_head])`` (heads only if the source has them)."""
    from safetensors.torch import load_file

    from dinov2.hub import create
    from dinov2.hub.checkpoints import load_backbone_weights, load_state_dict_strict, to_backbone_keys

    if spec.hub_name is not None:
        backbone = create(spec.hub_name, pretrained=True, weights=spec.weights)
    elif spec.backbone_file is not None and spec.backbone_file.is_dir():
        from dinov2.hub.export import load_backbone

        backbone = load_backbone(spec.backbone_file)
    elif spec.backbone_file is not None and spec.backbone_file.suffix == ".safetensors":
        backbone = DinoVisionTransformer(**spec.config)
        load_state_dict_strict(backbone, to_backbone_keys(load_file(str(spec.backbone_file))), spec.source)
    else:
        backbone = load_backbone_weights(DinoVisionTransformer(**spec.config), spec.source)
    return nn.ModuleDict({"backbone": backbone, **load_heads(spec)})
