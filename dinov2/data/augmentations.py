"""The DINOv2 multi-crop augmentation: two global crops and several local crops of one image.

Every random choice of one image's crops is drawn first, from an explicit torch.Generator, into a
`CropPlan`; rendering a plan is deterministic. A loader that seeds the generator from (seed, the
sample's position in the data stream) makes every crop reproducible regardless of history, worker
count or world size. The recipe is the reference's: RandomResizedCrop (bicubic), horizontal flip
0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur (kernel 9, sigma
0.1-2.0), solarize p 0.2 on the second global crop, ImageNet normalisation.

Blur probabilities: the paper's recipe is 1.0 / 0.1 / 0.5 for global-1 / global-2 / local crops
("intended", the default). The reference code wraps its blur in torchvision's RandomApply with
p = 1 - p, so it really blurs global-1 never, global-2 90% of the time and local crops 50%
("reference"; checked by reading its transforms.py and by counting RandomApply(p=1 - p) over
10,000 draws: 0.000 / 0.899 / 0.496).
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from dinov2.data.transforms import IMAGENET_MEAN, IMAGENET_STD

BlurProbabilities = Literal["intended", "reference"]

# (global-1, global-2, local) blur probabilities.
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "intended": (1.0, 0.1, 0.5),
    "reference": (0.0, 0.9, 0.5),
}
FLIP_PROBABILITY = 0.5
COLOR_JITTER_PROBABILITY = 0.8
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
GRAYSCALE_PROBABILITY = 0.2
BLUR_KERNEL_SIZE = 9
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_PROBABILITY = 0.2
SOLARIZE_THRESHOLD = 128
CROP_ASPECT_RATIO = (3 / 4, 4 / 3)


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _happens(generator: torch.Generator | None, probability: float) -> bool:
    return torch.rand((), generator=generator).item() < probability


@dataclass(frozen=True)
class ColorJitterPlan:
    order: tuple[int, ...]  # permutation of (brightness, contrast, saturation, hue), as torchvision applies them
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class CropPlan:
    """Every random choice for one crop: box (top, left, height, width) in source pixels, then photometry."""

    box: tuple[int, int, int, int]
    flip: bool
    color_jitter: ColorJitterPlan | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def sample_crop_box(
    width: int, height: int, scale: tuple[float, float], generator: torch.Generator | None
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area fraction in `scale`, log-uniform aspect in [3/4, 4/3], ten tries, then centre."""
    area = width * height
    log_ratio = (math.log(CROP_ASPECT_RATIO[0]), math.log(CROP_ASPECT_RATIO[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, (), generator=generator).item())
            return top, left, crop_height, crop_width
    # Fallback of torchvision: the largest centred box whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < CROP_ASPECT_RATIO[0]:
        crop_width, crop_height = width, int(round(width / CROP_ASPECT_RATIO[0]))
    elif in_ratio > CROP_ASPECT_RATIO[1]:
        crop_width, crop_height = int(round(height * CROP_ASPECT_RATIO[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class DataAugmentationDINO:
    """Callable on a PIL image -> {"global_crops", "global_crops_teacher", "local_crops", "offsets"}."""

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_probabilities: BlurProbabilities = "intended",
    ) -> None:
        if blur_probabilities not in BLUR_PROBABILITIES:
            raise ValueError(
                f"blur_probabilities must be one of {sorted(BLUR_PROBABILITIES)}, got {blur_probabilities!r}"
            )
        for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale}")
        if local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
        smallest = BLUR_KERNEL_SIZE // 2 + 1  # the blur pads by reflection, which needs more pixels than the pad
        for name, size in (("global_crops_size", global_crops_size), ("local_crops_size", local_crops_size)):
            if size < smallest:
                raise ValueError(
                    f"{name} must be at least {smallest} px for the {BLUR_KERNEL_SIZE}x{BLUR_KERNEL_SIZE} blur, "
                    f"got {size}"
                )
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size = global_crops_size
        self.local_crops_size = local_crops_size
        self.blur_probabilities = blur_probabilities
        self.global1_blur, self.global2_blur, self.local_blur = BLUR_PROBABILITIES[blur_probabilities]

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global 2x{self.global_crops_size} scale {self.global_crops_scale}, "
            f"local {self.local_crops_number}x{self.local_crops_size} scale {self.local_crops_scale}, "
            f"blur {self.blur_probabilities})"
        )

    def _plan_crop(
        self,
        width: int,
        height: int,
        scale: tuple[float, float],
        blur_probability: float,
        solarize_probability: float,
        generator: torch.Generator | None,
    ) -> CropPlan:
        box = sample_crop_box(width, height, scale, generator)
        flip = _happens(generator, FLIP_PROBABILITY)
        color_jitter = None
        if _happens(generator, COLOR_JITTER_PROBABILITY):
            order = tuple(torch.randperm(4, generator=generator).tolist())
            color_jitter = ColorJitterPlan(
                order=order,
                brightness=_uniform(generator, 1 - BRIGHTNESS, 1 + BRIGHTNESS),
                contrast=_uniform(generator, 1 - CONTRAST, 1 + CONTRAST),
                saturation=_uniform(generator, 1 - SATURATION, 1 + SATURATION),
                hue=_uniform(generator, -HUE, HUE),
            )
        grayscale = _happens(generator, GRAYSCALE_PROBABILITY)
        blur_sigma = _uniform(generator, *BLUR_SIGMA) if _happens(generator, blur_probability) else None
        solarize = _happens(generator, solarize_probability)
        return CropPlan(box, flip, color_jitter, grayscale, blur_sigma, solarize)

    def plan(self, width: int, height: int, generator: torch.Generator | None = None) -> list[CropPlan]:
        """All random choices for one image of this size: [global-1, global-2, local-1, ..., local-n]."""
        plans = [
            self._plan_crop(width, height, self.global_crops_scale, self.global1_blur, 0.0, generator),
            self._plan_crop(width, height, self.global_crops_scale, self.global2_blur, SOLARIZE_PROBABILITY, generator),
        ]
        plans += [
            self._plan_crop(width, height, self.local_crops_scale, self.local_blur, 0.0, generator)
            for _ in range(self.local_crops_number)
        ]
        return plans

    @staticmethod
    def render(image: Image.Image, plan: CropPlan, size: int) -> torch.Tensor:
        """Apply one crop plan to an RGB PIL image -> normalised float tensor (3, size, size)."""
        top, left, height, width = plan.box
        crop = F.resized_crop(
            image, top, left, height, width, [size, size], interpolation=F.InterpolationMode.BICUBIC, antialias=True
        )
        if plan.flip:
            crop = F.horizontal_flip(crop)
        if plan.color_jitter is not None:
            jitter = plan.color_jitter
            adjustments = (
                (F.adjust_brightness, jitter.brightness),
                (F.adjust_contrast, jitter.contrast),
                (F.adjust_saturation, jitter.saturation),
                (F.adjust_hue, jitter.hue),
            )
            for index in jitter.order:
                adjust, factor = adjustments[index]
                crop = adjust(crop, factor)
        if plan.grayscale:
            crop = F.rgb_to_grayscale(crop, num_output_channels=3)
        if plan.blur_sigma is not None:
            crop = F.gaussian_blur(crop, [BLUR_KERNEL_SIZE, BLUR_KERNEL_SIZE], [plan.blur_sigma, plan.blur_sigma])
        if plan.solarize:
            crop = F.solarize(crop, SOLARIZE_THRESHOLD)
        tensor = F.to_dtype(F.pil_to_tensor(crop), torch.float32, scale=True)
        return F.normalize(tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> dict[str, Any]:
        if image.mode != "RGB":
            image = image.convert("RGB")
        plans = self.plan(image.width, image.height, generator)
        global_crops = [self.render(image, plan, self.global_crops_size) for plan in plans[:2]]
        local_crops = [self.render(image, plan, self.local_crops_size) for plan in plans[2:]]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }
