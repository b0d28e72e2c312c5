"""The copy-detection network (a small residual CNN, GeM pooling, an L2-normalised projection) and its folder.

The architecture follows SSCD (Pizzi et al. 2022) at a size that trains on a CPU: ``stages`` stages of
``blocks_per_stage`` residual blocks, ``width`` channels doubling at each stage (each stage after the
first halves the resolution), generalised-mean pooling with exponent ``gem_p`` (3 as in SSCD: between
average and max pooling, so a few strong local features are not averaged away by a crop), a linear
projection to ``dim`` values and L2 normalisation, so the cosine of two descriptors is their dot product.

A descriptor folder (written by ``dinov2 train-descriptor``, read by ``embed.model: descriptor:<folder>``)::

    descriptor.safetensors   the weights
    descriptor.json          architecture, preprocessing, dedup thresholds and the precision / recall
                             measured at them on held-out copies, training summary
    metrics.json, plots/     what the training run measured (DVC metrics and plots)
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from dinov2.atomic import write_json
from dinov2.configuration.curation import DescriptorNetwork
from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

WEIGHTS_FILE = "descriptor.safetensors"
META_FILE = "descriptor.json"


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


def _conv_norm_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def gem(features: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean over the spatial positions: (B, C, H, W) -> (B, C)."""
    return features.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class CopyDetector(nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, dim) unit-norm copy descriptors."""

    def __init__(self, architecture: DescriptorNetwork):
        super().__init__()
        self.architecture = architecture
        width = architecture.width
        layers: list[nn.Module] = [_conv_norm_relu(3, width, 1)]
        for stage in range(architecture.stages):
            channels = width * 2**stage
            if stage > 0:
                layers.append(_conv_norm_relu(channels // 2, channels, 2))
            layers += [ResidualBlock(channels) for _ in range(architecture.blocks_per_stage)]
        self.trunk = nn.Sequential(*layers)
        self.projection = nn.Linear(width * 2 ** (architecture.stages - 1), architecture.dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(gem(self.trunk(pixels), self.architecture.gem_p)), dim=-1)


def to_input(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image as the (3, size, size) tensor the network takes: resized without keeping the aspect (as SSCD
    does for batches), normalised with ImageNet's mean and deviation (as SSCD, whatever the pool)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def write_descriptor(model: CopyDetector, meta: dict, folder: Path) -> None:
    """Weights and metadata into ``folder`` (the caller makes the folder appear only when complete)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    record = {"architecture": model.architecture.model_dump(), **meta}
    write_json(record, folder / META_FILE, sort_keys=False)


def read_descriptor(folder: str | Path) -> tuple[CopyDetector, dict]:
    """The network (eval mode, on the CPU) and the metadata of a descriptor folder."""
    folder = Path(folder)
    missing = [name for name in (META_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a descriptor folder (no {' or '.join(missing)}); write one with `dinov2 train-descriptor`"
        )
    meta = json.loads((folder / META_FILE).read_text())
    model = CopyDetector(DescriptorNetwork.model_validate(meta["architecture"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta
