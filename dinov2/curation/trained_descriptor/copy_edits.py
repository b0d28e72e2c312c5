"""The edits a copier makes, as random draws: the training views of the descriptor and the copies it is calibrated on.

``TrainingEdits.apply(image, rng, size)`` turns one image into one training view: a crop down to a small
fraction of each side (with some aspect change), a rotation, a mirror, a colour change (brightness,
contrast, saturation, hue, grey), an overlay (a line of text, or a filled shape like an emoji or a logo),
padding with a coloured border, then, at the model's input size, a blur and a JPEG recompression. Each
edit happens with its own probability, so some views keep most of the image and some lose most of it.

``calibration_copy(image, rng, strength)`` makes the held-out copies thresholds are calibrated on:

- ``planted``: one to three edits of the families and ranges that ``dinov2 prepare-default`` plants
  (crop to 80-95% of each side, rotation up to 10 degrees, mirror, brightness x0.75-1.25, JPEG 40-90);
- ``strong``: all of a crop to 70-95%, a rotation up to 12 degrees, a brightness and contrast change
  (x0.7-1.3 each) and JPEG at quality 50, with a mirror half of the time.

Every draw comes from the ``numpy`` generator passed in: the same generator state gives the same pixels.
"""

import io
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from dinov2.curation.default_data import BRIGHTNESS_FACTOR, CROP_KEPT, JPEG_QUALITY, ROTATION_DEGREES

CALIBRATION_STRENGTHS = ("planted", "strong")
STRONG_CROP_KEPT = (0.70, 0.95)
STRONG_ROTATION_DEGREES = 12.0
STRONG_COLOUR_FACTOR = (0.7, 1.3)
STRONG_JPEG_QUALITY = 50


def jpeg_recompressed(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def crop_fraction(image: Image.Image, kept_width: float, kept_height: float, rng: np.random.Generator) -> Image.Image:
    """The crop keeping these fractions of the width and height, at a random position."""
    width, height = image.size
    crop_w, crop_h = max(1, round(width * kept_width)), max(1, round(height * kept_height))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(value) for value in rng.integers(0, 256, size=3))


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hue, saturation, value = image.convert("HSV").split()
    turned = (np.asarray(hue, dtype=np.int16) + round(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(turned.astype(np.uint8)), saturation, value)).convert("RGB")


@dataclass(frozen=True)
class TrainingEdits:
    """Probabilities and strengths of the training edits (``descriptor.edits`` in params.yaml, defaults there)."""

    crop_probability: float
    crop_min_kept: float  # smallest fraction of each side a crop keeps
    aspect_change: float  # the kept width / height ratio is changed by up to this factor
    rotation_probability: float
    rotation_degrees: float
    flip_probability: float
    colour_probability: float
    colour_strength: float  # brightness, contrast, saturation factors in [1 - s, 1 + s]
    hue_shift: float  # of the hue circle, either way
    grey_probability: float
    overlay_probability: float
    overlay_size: float  # largest overlay, as a fraction of the image side
    padding_probability: float
    padding_max: float  # widest border, as a fraction of the image side
    blur_probability: float
    blur_radius: float  # largest Gaussian radius, in pixels of the model input
    jpeg_probability: float
    jpeg_quality: tuple[int, int]
    original_view_probability: float  # the first view is the unedited image (what a copy is compared with)

    def apply(self, image: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
        """One training view of ``image`` (RGB), ``size`` x ``size`` pixels."""
        if rng.random() < self.crop_probability:
            kept = float(rng.uniform(self.crop_min_kept, 1.0))
            aspect = float(np.exp(rng.uniform(-1, 1) * np.log(self.aspect_change)))
            image = crop_fraction(image, min(1.0, kept * np.sqrt(aspect)), min(1.0, kept / np.sqrt(aspect)), rng)
        if rng.random() < self.rotation_probability:
            angle = float(rng.uniform(-self.rotation_degrees, self.rotation_degrees))
            fill = (0, 0, 0) if rng.random() < 0.5 else _random_colour(rng)
            image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
        if rng.random() < self.flip_probability:
            image = ImageOps.mirror(image)
        if rng.random() < self.colour_probability:
            image = self._colour(image, rng)
        if rng.random() < self.overlay_probability:
            image = self._overlay(image, rng)
        if rng.random() < self.padding_probability:
            image = self._pad(image, rng)
        image = image.resize((size, size), Image.BILINEAR)
        if rng.random() < self.blur_probability:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, self.blur_radius))))
        if rng.random() < self.jpeg_probability:
            image = jpeg_recompressed(image, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        return image

    def _colour(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        low, high = 1 - self.colour_strength, 1 + self.colour_strength
        for enhancer in rng.permutation(3):
            kind = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[enhancer]
            image = kind(image).enhance(float(rng.uniform(low, high)))
        if self.hue_shift > 0:
            image = _shift_hue(image, float(rng.uniform(-self.hue_shift, self.hue_shift)))
        if rng.random() < self.grey_probability:
            image = ImageOps.grayscale(image).convert("RGB")
        return image

    def _overlay(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """A line of text or a filled shape (ellipse, box, star-like polygon) somewhere on the image."""
        image = image.copy()
        draw = ImageDraw.Draw(image)
        side = min(image.size)
        extent = max(2, round(side * float(rng.uniform(0.1, self.overlay_size))))
        left = int(rng.integers(0, max(1, image.width - extent)))
        top = int(rng.integers(0, max(1, image.height - extent)))
        colour = _random_colour(rng)
        kind = int(rng.integers(0, 4))
        if kind == 0:
            letters = "".join(rng.choice(list(string.ascii_letters + string.digits), size=int(rng.integers(2, 8))))
            font = ImageFont.load_default(size=max(4, extent // 2))
            draw.text((left, top), letters, fill=colour, font=font)
        elif kind == 1:
            draw.ellipse((left, top, left + extent, top + extent), fill=colour)
        elif kind == 2:
            draw.rectangle((left, top, left + extent, top + extent // 2 + 1), fill=colour)
        else:
            centre = np.array([left + extent / 2, top + extent / 2])
            corners = 2 * int(rng.integers(3, 7))
            angles = np.linspace(0, 2 * np.pi, corners, endpoint=False) + rng.uniform(0, np.pi)
            radii = np.where(np.arange(corners) % 2 == 0, extent / 2, extent / 4)
            points = centre + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
            draw.polygon([tuple(point) for point in points], fill=colour)
        return image

    def _pad(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        side = min(image.size)
        borders = tuple(round(side * float(rng.uniform(0, self.padding_max))) for _ in range(4))
        return ImageOps.expand(image, border=borders, fill=_random_colour(rng))


def _planted_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to three edits of the kinds and ranges ``dinov2 prepare-default`` plants, in its order."""
    kinds = sorted(rng.choice(5, size=int(rng.integers(1, 4)), replace=False))
    quality = None
    for kind in kinds:
        if kind == 0:
            kept = float(rng.uniform(*CROP_KEPT))
            image = crop_fraction(image, kept, kept, rng).resize(image.size, Image.BICUBIC)
        elif kind == 1:
            angle = float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
            image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
        elif kind == 2:
            image = ImageOps.mirror(image)
        elif kind == 3:
            image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(*BRIGHTNESS_FACTOR)))
        else:
            quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    return image if quality is None else jpeg_recompressed(image, quality)


def _strong_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    kept = float(rng.uniform(*STRONG_CROP_KEPT))
    image = crop_fraction(image, kept, kept, rng).resize(image.size, Image.BICUBIC)
    angle = float(rng.uniform(-STRONG_ROTATION_DEGREES, STRONG_ROTATION_DEGREES))
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=(0, 0, 0))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(*STRONG_COLOUR_FACTOR)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(*STRONG_COLOUR_FACTOR)))
    return jpeg_recompressed(image, STRONG_JPEG_QUALITY)


def calibration_copy(image: Image.Image, rng: np.random.Generator, strength: str) -> Image.Image:
    """A copy of ``image`` (RGB) at one of ``CALIBRATION_STRENGTHS``, the size of the original."""
    if strength == "planted":
        return _planted_copy(image, rng)
    if strength == "strong":
        return _strong_copy(image, rng)
    raise ValueError(f"unknown copy strength {strength!r}; expected one of {', '.join(CALIBRATION_STRENGTHS)}")
