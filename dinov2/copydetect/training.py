"""Training the copy-detection network on a pool without labels: every image is its own class (SSCD).

Each step draws B pool images, makes two copy-edited views of each (``edits.training_view``) and
minimises InfoNCE between the views plus ``entropy_weight`` times the entropy regulariser (``loss.py``).
The views of image i in epoch e come from a generator seeded by ``(seed, e, i)``, so they do not depend
on which DataLoader worker made them, and the image order of epoch e from one seeded by ``(seed, e)``:
on the CPU the same seed gives the same weights, bit for bit.
"""

import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinov2.configuration.curation import DescriptorEdits, DescriptorParams
from dinov2.copydetect.edits import training_view
from dinov2.copydetect.loss import entropy_regulariser, info_nce
from dinov2.copydetect.network import CopyDetector, to_input
from dinov2.data.images import read_rgb

logger = logging.getLogger(__name__)

# An image is an RGB PIL image or the path of a file read with ``read_rgb``.
ImageSource = Image.Image | str


def working_copy(image: Image.Image, input_size: int) -> Image.Image:
    """The image shrunk so its short side is at most twice the input size: edits stay cheap on big photos,
    and a crop down to half of each side still has the pixels the network sees."""
    short = min(image.size)
    limit = 2 * input_size
    if short <= limit:
        return image
    scale = limit / short
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def load_image(source: ImageSource, input_size: int, max_pixels: int | None) -> Image.Image:
    image = source.convert("RGB") if isinstance(source, Image.Image) else read_rgb(source, max_pixels)
    return working_copy(image, input_size)


class CopyPairs(Dataset):
    """(epoch e, index i) -> two copy-edited views of image i, (3, S, S) tensors each, drawn for epoch e.

    The epoch is part of the key, so one DataLoader (its workers started once) serves every epoch.
    """

    def __init__(
        self, sources: Sequence[ImageSource], edits: DescriptorEdits, input_size: int, seed: int, max_pixels: int | None
    ):
        self.sources, self.edits, self.input_size, self.seed, self.max_pixels = (
            sources,
            edits,
            input_size,
            seed,
            max_pixels,
        )

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        image = load_image(self.sources[index], self.input_size, self.max_pixels)
        if rng.random() < self.edits.original_view_probability:
            first = image.resize((self.input_size, self.input_size), Image.BILINEAR)
        else:
            first = training_view(image, rng, self.input_size, self.edits)
        second = training_view(image, rng, self.input_size, self.edits)
        return to_input(first, self.input_size), to_input(second, self.input_size)


def learning_rate_at(step: int, total: int, schedule: DescriptorParams) -> float:
    """Linear warm-up over ``warmup_fraction`` of the steps, then a cosine decay to zero."""
    warmup = max(1, round(total * schedule.warmup_fraction))
    if step < warmup:
        return schedule.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return schedule.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def _step(
    model, optimizer, first, second, learning_rate: float, schedule: DescriptorParams, device: str
) -> dict[str, float]:
    started = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    vectors = model(torch.cat([first, second]).to(device, memory_format=torch.channels_last))
    first_vectors, second_vectors = vectors.split(len(first))
    contrastive = info_nce(first_vectors, second_vectors, schedule.temperature)
    entropy = entropy_regulariser(first_vectors, second_vectors)
    loss = contrastive + schedule.entropy_weight * entropy
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {
        "loss": loss.item(),
        "info_nce": contrastive.item(),
        "entropy": entropy.item(),
        "learning_rate": learning_rate,
        "step_seconds": time.perf_counter() - started,
    }


def describe(model: CopyDetector, images: Sequence[Image.Image], device: str = "cpu", batch: int = 256) -> np.ndarray:
    """(len(images), dim) float32 descriptors of RGB images, the network in eval mode."""
    size = model.architecture.input_size
    model.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.stack([to_input(image, size) for image in images[start : start + batch]])
            chunks.append(model(pixels.to(device)).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, model.architecture.dim), dtype=np.float32)


def fit(
    sources: Sequence[ImageSource],
    params: DescriptorParams,
    seed: int,
    device: str = "cpu",
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[CopyDetector, list[dict[str, float]]]:
    """Train a ``CopyDetector`` of ``params.network`` on ``sources`` with the schedule, edits, workers and image
    limit of ``params``; returns it (eval mode, on the CPU) and each step's losses.

    ``on_step(step, total_steps, losses)`` is called after every step (progress, tracking).
    """
    schedule, architecture = params, params.network
    batch_size = min(schedule.batch_size, len(sources))
    if batch_size < 2:
        raise ValueError(f"contrastive training needs at least 2 images, got {len(sources)}")
    torch.manual_seed(seed)
    # Channels-last convolutions run faster on CPUs (and on GPUs) at these small channel counts.
    model = CopyDetector(architecture).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    dataset = CopyPairs(sources, params.edits, architecture.input_size, seed, params.max_pixels)
    steps_per_epoch = len(sources) // batch_size
    total = schedule.epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(schedule.epochs):
        order = np.random.default_rng((seed, epoch)).permutation(len(sources)).tolist()
        batches = [[(epoch, i) for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(steps_per_epoch)]
        for first, second in DataLoader(dataset, batch_sampler=batches, num_workers=params.num_workers):
            learning_rate = learning_rate_at(step, total, schedule)
            losses = _step(model, optimizer, first, second, learning_rate, schedule, device)
            history.append(losses)
            if on_step is not None:
                on_step(step, total, losses)
            step += 1
    return model.to("cpu", memory_format=torch.contiguous_format).eval(), history
