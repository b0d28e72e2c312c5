"""What turns images into vectors: a backbone (ours, a released DINOv2, a torch.hub model) or the copy descriptor.

``build_embedder(model, weights)`` accepts:

- ``copy_descriptor``: the training-free copy-detection descriptor of ``dinov2/copydetect/copy_descriptor.py``;
- ``raw_pixels``: the image resized to ``crop_size`` squared, mean-centred: a semantic baseline for retrieval
  that needs no trained model (the evaluation's raw-pixel baseline, per image);
- a hub name such as ``dinov2_vits14`` (random init, or ``weights`` = path / URL / ``LVD142M``);
- a ``.safetensors`` file written by ``dinov2.hub.save_backbone`` (the architecture is in the file);
- ``torchhub:<repo>:<entry point>``, e.g. ``torchhub:facebookresearch/dinov2:dinov2_vits14`` or a local
  hub directory, loaded with ``torch.hub.load`` (the model must return one embedding per image);
- ``descriptor:<folder>``: a copy-detection descriptor trained on the pool by ``dinov2 train-descriptor``,
  with the dedup thresholds calibrated when it was trained;
- ``sscd:<path or URL>``: a released SSCD TorchScript file (``sscd_disc_mixup.torchscript.pt``), with
  SSCD's preprocessing and the paper's dedup thresholds for it.
"""

import hashlib
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dinov2.copydetect.copy_descriptor import (
    COPY_DESCRIPTOR_DIM,
    COPY_DESCRIPTOR_SETTINGS,
    COPY_DESCRIPTOR_THRESHOLDS,
    copy_descriptor,
)
from dinov2.curation.embeddings import embedder_name
from dinov2.data.transforms import make_eval_transform

# The paper's cosine thresholds for copy-detection embeddings (SSCD): self-dedup 0.6, relative 0.45. They
# are a backbone's defaults, recorded as calibrated for SSCD: dedup refuses them for any other model.
PAPER_THRESHOLDS = {"self": 0.6, "relative": 0.45}
PAPER_THRESHOLDS_MODEL = "SSCD (the paper's copy-detection model)"
# SSCD's batch preprocessing: resize to a fixed square (skewing the image, which copy detection tolerates
# better than a centre crop that cuts the copied content), ImageNet normalisation.
SSCD_INPUT_SIZE = 320


def parameter_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes): the model's identity."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        values = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{values.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def _copy_descriptor_fingerprint() -> str:
    return f"sha256:{hashlib.sha256(repr(COPY_DESCRIPTOR_SETTINGS).encode()).hexdigest()[:16]}"


class Embedder(Protocol):
    """Embedding is split in two so the per-image half runs in DataLoader workers, beside the decoding.

    ``fingerprint`` identifies the model (two sets compare only when it matches); ``thresholds`` are the
    dedup cosines calibrated for ``thresholds_calibrated_for``, which is ``name`` only when they were
    measured for this very embedder.
    """

    name: str
    dim: int
    fingerprint: str
    thresholds: dict[str, float]
    thresholds_calibrated_for: str

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image as the tensor ``embed_batch`` takes (runs in a DataLoader worker)."""
        ...

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(B, dim) float32, each row of unit norm, from B stacked ``preprocess`` outputs."""
        ...

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), dim) float32, each row of unit norm."""
        ...


@dataclass
class CopyDescriptorEmbedder:
    name: str = "copy_descriptor"
    dim: int = COPY_DESCRIPTOR_DIM
    fingerprint: str = field(default_factory=_copy_descriptor_fingerprint)
    thresholds: dict[str, float] = field(default_factory=lambda: dict(COPY_DESCRIPTOR_THRESHOLDS))
    thresholds_calibrated_for: str = "copy_descriptor"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(copy_descriptor(image))

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        return batch.numpy()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch(torch.stack([self.preprocess(image) for image in images]))


class RawPixelsEmbedder:
    """RGB pixels of the image resized to ``side`` x ``side`` (the aspect is not kept), minus their mean, unit norm.

    The mean is the image's own, not the set's, so a vector does not depend on the other images of its manifest.
    It is no copy detector: the thresholds it records are the paper's, calibrated for SSCD, which dedup refuses.
    """

    name = "raw_pixels"

    def __init__(self, side: int):
        self.side = side
        self.dim = 3 * side * side
        self.fingerprint = f"sha256:{hashlib.sha256(f'raw_pixels side={side}'.encode()).hexdigest()[:16]}"
        self.thresholds = dict(PAPER_THRESHOLDS)
        self.thresholds_calibrated_for = PAPER_THRESHOLDS_MODEL
        self.preprocess = partial(raw_pixels, side=side)

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        return batch.numpy()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch(torch.stack([self.preprocess(image) for image in images]))


def raw_pixels(image: Image.Image, side: int) -> torch.Tensor:
    if image.size != (side, side):
        image = image.resize((side, side), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1) / 255.0)
    pixels -= pixels.mean()
    return pixels / pixels.norm().clamp_min(1e-8)


class BackboneEmbedder:
    """Any module mapping a normalised (B, 3, H, W) batch to (B, D) features; outputs are L2-normalised."""

    def __init__(self, model: nn.Module, name: str, crop_size: int = 224, device: str = "cpu"):
        self.model = model.eval().to(device)
        self.name = name
        self.device = torch.device(device)
        self.fingerprint = parameter_fingerprint(model)
        self.thresholds = dict(PAPER_THRESHOLDS)
        self.thresholds_calibrated_for = PAPER_THRESHOLDS_MODEL
        patch_size = getattr(model, "patch_size", 1)
        if crop_size % patch_size:
            raise ValueError(f"crop size {crop_size} is not a multiple of the patch size {patch_size} of {name}")
        # A plain transform, not a method: DataLoader workers get it without a reference to the model.
        self.preprocess = make_eval_transform(resize_size=crop_size * 256 // 224, crop_size=crop_size)
        with torch.inference_mode():
            probe = self._forward(torch.zeros(1, 3, crop_size, crop_size, device=self.device))
        self.dim = int(probe.shape[1])

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model(pixels)
        if not isinstance(output, torch.Tensor) or output.ndim != 2:
            raise ValueError(f"{self.name} must return one (B, D) tensor per batch, got {type(output).__name__}")
        return output

    def embed_batch(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            features = F.normalize(self._forward(batch.to(self.device)).float(), dim=-1)
        return features.cpu().numpy()

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch(torch.stack([self.preprocess(image) for image in images]))


def trained_descriptor_embedder(model: str, device: str) -> BackboneEmbedder:
    """``descriptor:<folder>``: its network, input size and the thresholds calibrated for it when trained."""
    from dinov2.copydetect.network import read_descriptor, to_input

    network, meta = read_descriptor(model.removeprefix("descriptor:"))
    size = network.architecture.input_size
    embedder = BackboneEmbedder(network, model, crop_size=size, device=device)
    embedder.preprocess = partial(to_input, size=size)
    embedder.thresholds = dict(meta["thresholds"])
    embedder.thresholds_calibrated_for = model
    return embedder


def sscd_file(location: str) -> Path:
    """A local SSCD TorchScript file: the path itself, or a URL's download in the torch.hub cache."""
    if location.startswith(("http://", "https://")):
        target = Path(torch.hub.get_dir()) / "sscd" / Path(location.split("?")[0]).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(location, str(target))
        return target
    path = Path(location)
    if not path.is_file():
        raise FileNotFoundError(f"SSCD TorchScript file not found: {path}")
    return path


def sscd_embedder(model: str, device: str) -> BackboneEmbedder:
    """``sscd:<path or URL>``: SSCD inputs are 320 x 320 and ImageNet-normalised; the dedup thresholds are the
    paper's, which it measured with SSCD (SSCD's own documentation puts cosine 0.75 at about 90% precision on
    DISC21 pairs for sscd_disc_mixup: ``embed.calibrated_thresholds`` sets stricter values)."""
    from dinov2.copydetect.network import to_input

    path = sscd_file(model.removeprefix("sscd:"))
    try:
        with warnings.catch_warnings():
            # SSCD is released as TorchScript, which torch now calls deprecated: the format of the files is not ours.
            warnings.simplefilter("ignore", FutureWarning)
            network = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise ValueError(f"{path} is not a TorchScript model: {str(error).splitlines()[0]}") from error
    embedder = BackboneEmbedder(network, model, crop_size=SSCD_INPUT_SIZE, device=device)
    embedder.preprocess = partial(to_input, size=SSCD_INPUT_SIZE)
    embedder.thresholds_calibrated_for = model
    return embedder


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_embedder(model: str, weights: str | None = None, crop_size: int = 224, device: str | None = None) -> Embedder:
    device = device or default_device()
    if model == "copy_descriptor":
        if weights:
            raise ValueError("the copy descriptor has no weights; remove 'weights'")
        return CopyDescriptorEmbedder()
    if model == "raw_pixels":
        if weights:
            raise ValueError("raw_pixels has no weights; remove 'weights'")
        return RawPixelsEmbedder(crop_size)
    if model.startswith(("descriptor:", "sscd:")):
        if weights:
            raise ValueError(f"{model} holds its own weights; remove 'weights'")
        if model.startswith("descriptor:"):
            return trained_descriptor_embedder(model, device)
        return sscd_embedder(model, device)
    if model.startswith("torchhub:"):
        parts = model.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ValueError(f"{model!r}: expected torchhub:<repo or local dir>:<entry point>")
        _, repo, entry = parts
        local = Path(repo).is_dir()
        network = torch.hub.load(repo, entry, source="local" if local else "github", trust_repo=True)
        return BackboneEmbedder(network, model, crop_size, device)
    from dinov2.hub.export import is_backbone_file

    if is_backbone_file(model):
        from dinov2.hub import load_backbone

        return BackboneEmbedder(load_backbone(model), embedder_name(model), crop_size, device)
    from dinov2.hub import create

    network = create(model, pretrained=weights is not None, **({"weights": weights} if weights else {}))
    return BackboneEmbedder(network, model, crop_size, device)
