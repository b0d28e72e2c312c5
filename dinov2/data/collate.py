"""Turning a list of multi-crop samples into the batch the DINOv2 student and teacher consume."""

import logging
from collections.abc import Sequence
from typing import Any

import torch

from dinov2.data.masking import MaskingGenerator

logger = logging.getLogger(__name__)

Sample = tuple[dict[str, Any], Any]


def stratified_mask_counts(
    n_images: int,
    n_tokens: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """How many patches to mask in each image (masked images first) and the upper bound of the total.

    int(n_images * mask_probability) images are masked; their ratios are stratified: the interval
    [min_ratio, max_ratio] is split into equal parts and image i draws its ratio uniformly within
    part i, so every batch covers the whole range. The remaining images are not masked.
    """
    n_masked_images = int(n_images * mask_probability)
    bounds = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_images + 1).tolist()
    counts: list[int] = []
    upperbound = 0
    for low, high in zip(bounds[:-1], bounds[1:], strict=True):
        ratio = low + (high - low) * torch.rand((), generator=generator).item()
        counts.append(int(n_tokens * ratio))
        upperbound += int(n_tokens * high)
    counts.extend([0] * (n_images - n_masked_images))
    return counts, upperbound


def collate_data_and_cast(
    samples_list: Sequence[Sample | None],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Stack crops crop-major (all first global crops, then all second ones; locals likewise) and draw iBOT masks.

    `None` samples (unreadable images) are dropped and counted in "n_skipped". `n_tokens` defaults
    to the mask generator's grid size. Without a mask generator nothing is masked (distillation).
    Mask ratios, block positions and the shuffle of masks over images all come from `generator`
    (else torch's global RNG).
    """
    samples = [sample for sample in samples_list if sample is not None]
    n_skipped = len(samples_list) - len(samples)
    if not samples:
        raise ValueError(f"every one of the {len(samples_list)} samples of this batch was unreadable")
    if n_tokens is None:
        if mask_generator is None:
            raise ValueError("collate_data_and_cast needs n_tokens or a mask_generator to size the masks")
        n_tokens = mask_generator.num_patches
    if mask_generator is not None and mask_generator.num_patches != n_tokens:
        raise ValueError(f"mask_generator covers {mask_generator.num_patches} patches but n_tokens is {n_tokens}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    if mask_generator is None:
        mask_probability = 0.0

    crops = [sample[0] for sample in samples]
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    collated_global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])
    collated_local_crops = (
        torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])
        if n_local
        else torch.empty(0, dtype=collated_global_crops.dtype)
    )

    n_images = len(collated_global_crops)
    counts, upperbound = stratified_mask_counts(n_images, n_tokens, mask_ratio_tuple, mask_probability, generator)
    if mask_generator is None:
        masks = torch.zeros(n_images, n_tokens, dtype=torch.bool)
    else:
        masks = torch.stack([torch.from_numpy(mask_generator(count, generator)).flatten() for count in counts])
        masks = masks[torch.randperm(n_images, generator=generator)]

    mask_indices_list = masks.flatten().nonzero().flatten()
    patches_per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1)
    masks_weight = (1.0 / patches_per_image).expand_as(masks)[masks]
    if n_skipped:
        logger.warning("dropped %d unreadable samples from a batch of %d", n_skipped, len(samples_list))
    return {
        "collated_global_crops": collated_global_crops.to(dtype),
        "collated_local_crops": collated_local_crops.to(dtype),
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.full((1,), fill_value=len(mask_indices_list), dtype=torch.long),
        "upperbound": upperbound,
        "n_skipped": n_skipped,
    }
