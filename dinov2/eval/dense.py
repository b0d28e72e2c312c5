"""Dense evaluation in pure PyTorch: linear heads on frozen patch tokens for segmentation and depth.

Heads follow the DINOv2 linear protocol (BatchNorm + 1x1 conv on the last block's patch tokens,
logits bilinearly upsampled to the label size). They train on pre-extracted token maps; no mmcv.

Data:
- ``SegmentationFolder``: ADE20K layout, ``<root>/images/<stem>.jpg`` + ``<root>/annotations/<stem>.png``
  (label 0 = "other", ignored; label i > 0 is class i - 1).
- ``DepthFolder``: NYU-style, ``<root>/images/<stem>.(jpg|png)`` + ``<root>/depth/<stem>.png``
  (16-bit, depth in units of 1/``depth_scale`` metres; 0 = no measurement).
- ``MosaicSegmentation``: a PROXY segmentation set built from a labelled classification folder:
  each sample is a 2x2 mosaic of four real images whose pixel labels are the tiles' classes. It
  tests that patch features localise class evidence; it is not a scene-parsing benchmark and its
  mIoU is not comparable with ADE20K numbers.

Depth deviates from the reference, which classifies over 256 depth bins: here the head regresses
log-depth directly (L1 loss), a simpler linear readout.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dinov2.data.images import SkippedImages, list_images, try_read_rgb
from dinov2.eval.datasets import LabelledImageFolder

IGNORE_INDEX = 255
ADE20K_CLASSES = 150


def patch_token_map(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normed patch tokens of the last block as a (B, D, h, w) map."""
    return model.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]


class MosaicSegmentation(torch.utils.data.Dataset):
    """2x2 mosaics of labelled images (a proxy segmentation set, see the module docs)."""

    def __init__(
        self,
        folder: LabelledImageFolder,
        n_mosaics: int,
        tile_transform: Callable[[Image.Image], torch.Tensor],
        tile_size: int,
        seed: int = 0,
    ):
        if n_mosaics < 1:
            raise ValueError(f"n_mosaics must be >= 1, got {n_mosaics}")
        self.folder = folder
        self.tile_transform = tile_transform
        self.tile_size = tile_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.tiles = torch.randint(0, len(folder), (n_mosaics, 4), generator=generator)
        self.classes = folder.classes

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        size = self.tile_size
        image = torch.zeros(3, 2 * size, 2 * size)
        labels = torch.zeros(2 * size, 2 * size, dtype=torch.long)
        for position, sample in enumerate(self.tiles[index].tolist()):
            tile = self.folder.read(sample)
            if tile is None:
                return None
            row, col = divmod(position, 2)
            area = (slice(row * size, (row + 1) * size), slice(col * size, (col + 1) * size))
            image[(slice(None), *area)] = self.tile_transform(tile)
            labels[area] = self.folder.labels[sample]
        return image, labels

    @property
    def fingerprint(self) -> str:
        identity = f"mosaic|{self.folder.fingerprint}|{self.seed}|{len(self)}|{self.tile_size}"
        return hashlib.sha256(identity.encode()).hexdigest()


class _PairedFolder(torch.utils.data.Dataset):
    """Images under ``<root>/images`` paired by file stem with targets under ``<root>/<target_dir>``."""

    target_dir = ""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor], size: int):
        self.root = Path(root)
        images = list_images(self.root / "images")
        targets = {path.stem: path for path in list_images(self.root / self.target_dir)}
        unpaired = [path.name for path in images if path.stem not in targets]
        if unpaired:
            raise ValueError(
                f"{len(unpaired)} images under {self.root / 'images'} have no {self.target_dir} file "
                f"(e.g. {unpaired[0]}): labels missing"
            )
        self.pairs = [(path, targets[path.stem]) for path in images]
        self.transform = transform
        self.size = size
        self.skipped = SkippedImages()

    def __len__(self) -> int:
        return len(self.pairs)

    def read_target(self, path: Path) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        image_path, target_path = self.pairs[index]
        image = try_read_rgb(image_path, self.skipped)
        if image is None:
            return None
        image = image.resize((self.size, self.size), Image.BICUBIC)
        return self.transform(image), self.read_target(target_path)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(f"{self.root.resolve()}|{self.size}|{type(self).__name__}".encode())
        for image_path, target_path in self.pairs:
            for path in (image_path, target_path):
                stat = path.stat()
                digest.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()


class SegmentationFolder(_PairedFolder):
    """ADE20K layout; labels resized with nearest neighbour, 0 ("other") becomes ignored."""

    target_dir = "annotations"

    def read_target(self, path: Path) -> torch.Tensor:
        with Image.open(path) as label_image:
            labels = np.asarray(label_image.resize((self.size, self.size), Image.NEAREST), dtype=np.int64)
        labels = labels - 1
        labels[labels < 0] = IGNORE_INDEX
        return torch.from_numpy(labels)


class DepthFolder(_PairedFolder):
    """NYU-style depth PNGs; returned in metres (0 where there is no measurement)."""

    target_dir = "depth"

    def __init__(self, root: str | Path, transform: Callable, size: int, depth_scale: float = 1000.0):
        super().__init__(root, transform, size)
        self.depth_scale = depth_scale

    def read_target(self, path: Path) -> torch.Tensor:
        with Image.open(path) as depth_image:
            depth = np.asarray(depth_image.resize((self.size, self.size), Image.NEAREST), dtype=np.float32)
        return torch.from_numpy(depth / self.depth_scale)


class LinearDenseHead(nn.Module):
    """BatchNorm + 1x1 conv on a (B, D, h, w) token map, upsampled bilinearly to the target size."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, out_channels, kernel_size=1)

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.conv(self.norm(tokens))
        rows = _bilinear_matrix(logits.shape[-2], size[0], logits.device)
        cols = _bilinear_matrix(logits.shape[-1], size[1], logits.device)
        return torch.einsum("Hh,bchw,Ww->bcHW", rows, logits, cols)


def _bilinear_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out, in) weights of a 1-D bilinear resize (align_corners=False). Upsampling as two matmuls
    equals F.interpolate but has a deterministic backward pass, unlike its multi-threaded CPU kernel."""
    identity = torch.eye(in_size, device=device)[None]
    return F.interpolate(identity, size=out_size, mode="linear", align_corners=False)[0].T


def _train_head(
    head: nn.Module,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    total = epochs * -(-len(tokens) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples to estimate batch statistics
                continue
            output = head(tokens[batch].float(), targets.shape[-2:])
            loss = loss_fn(output, targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


def train_segmentation_head(
    tokens: torch.Tensor, label_maps: torch.Tensor, num_classes: int, *, epochs: int = 10,
    learning_rate: float = 1e-3, batch_size: int = 32, seed: int = 0,
) -> LinearDenseHead:  # fmt: skip
    torch.manual_seed(seed)  # the head's initialisation
    head = LinearDenseHead(tokens.shape[1], num_classes)
    loss_fn = lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)  # noqa: E731
    return _train_head(head, tokens, label_maps, loss_fn, epochs, learning_rate, batch_size, seed)


def _log_depth_l1(output: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    valid = depth > 0
    return (output[:, 0][valid] - depth[valid].log()).abs().mean()


def train_depth_head(
    tokens: torch.Tensor, depth_maps: torch.Tensor, *, epochs: int = 10, learning_rate: float = 1e-3,
    batch_size: int = 32, seed: int = 0,
) -> LinearDenseHead:  # fmt: skip
    torch.manual_seed(seed)  # the head's initialisation
    return _train_head(
        LinearDenseHead(tokens.shape[1], 1), tokens, depth_maps, _log_depth_l1, epochs, learning_rate, batch_size, seed
    )


@torch.no_grad()
def predict(head: LinearDenseHead, tokens: torch.Tensor, size: tuple[int, int], batch_size: int = 64) -> torch.Tensor:
    outputs = [head(tokens[i : i + batch_size].float(), size) for i in range(0, len(tokens), batch_size)]
    output = torch.cat(outputs)
    return output.argmax(dim=1) if output.shape[1] > 1 else output[:, 0].exp()


def segmentation_metrics(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """mIoU over the classes that occur in the target or the prediction, and pixel accuracy.

    Pixels labelled ``IGNORE_INDEX`` count for nothing.
    """
    valid = target != IGNORE_INDEX
    pred, truth = predicted[valid].long(), target[valid].long()
    confusion = torch.bincount(truth * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    intersection = confusion.diag().double()
    union = confusion.sum(dim=0).double() + confusion.sum(dim=1).double() - intersection
    present = union > 0
    return {
        "miou": float((intersection[present] / union[present]).mean()),
        "pixel_accuracy": float(intersection.sum() / confusion.sum()),
    }


def depth_metrics(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """RMSE (metres), mean absolute relative error and delta1 (share with max(p/t, t/p) < 1.25) over
    pixels with a measurement (target > 0)."""
    valid = target > 0
    if not bool(valid.any()):
        raise ValueError("no pixel of the depth target holds a measurement (all are 0)")
    pred, truth = predicted[valid].double().clamp_min(1e-6), target[valid].double()
    ratio = torch.maximum(pred / truth, truth / pred)
    return {
        "rmse": float(((pred - truth) ** 2).mean().sqrt()),
        "abs_rel": float(((pred - truth).abs() / truth).mean()),
        "delta1": float((ratio < 1.25).double().mean()),
    }
