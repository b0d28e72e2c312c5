"""The one vocabulary of copy edits: what a copier does to an image, as recorded edits and as random draws.

``Edit`` is one recorded edit, written as text in ground truth (``crop:0.87@2,1+rotate:3.2+jpeg:55``) and read
back by ``parse_edits``:

- ``crop:K@X,Y``: the rectangle keeping the fraction K of each side, its top-left corner at (X, Y), rescaled
  back to the image's size (as a site that crops and re-serves at one size);
- ``trim:K@X,Y``: the same rectangle, not rescaled;
- ``rotate:D`` (degrees, corners filled black), ``flip`` (left-right mirror), ``brightness:F``,
  ``contrast:F``, ``resize:S`` (to S x S), ``jpeg:Q`` (recompressed at quality Q).

``draw_edits(rng, size, ranges)`` draws the edits of one copy: a few edits of different kinds among crop,
rotate, flip, brightness and jpeg, applied in that order, with strengths drawn in ``ranges``
(``CopyEditRanges``). The demo data plants such copies; the trained descriptor is calibrated on them.
``training_view(image, rng, size, edits)`` makes one training view of the descriptor from the same edits and
a few more (aspect change, hue, grey, overlays, padding, blur). ``WEB_COPIES`` names the copies the tests and
benchmarks plant on real photographs. Every draw comes from the ``numpy`` generator passed in: the same
generator state gives the same pixels.
"""

import io
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from dinov2.configuration.curation import CopyEditRanges, DescriptorEdits

DRAWN_KINDS = ("crop", "rotate", "flip", "brightness", "jpeg")  # what draw_edits picks from, in this order
KINDS = (*DRAWN_KINDS, "trim", "contrast", "resize")
GEOMETRIC_KINDS = {"crop", "trim", "rotate"}


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


@dataclass(frozen=True)
class Edit:
    kind: str
    strength: float | None = None  # crop/trim: kept fraction; rotate: degrees; brightness/contrast: factor; ...
    offset: tuple[int, int] = (0, 0)  # crop/trim: left, top of the kept rectangle

    def __str__(self) -> str:
        if self.kind == "flip":
            return "flip"
        if self.kind in ("crop", "trim"):
            return f"{self.kind}:{self.strength:g}@{self.offset[0]},{self.offset[1]}"
        return f"{self.kind}:{self.strength:g}"

    def apply(self, image: Image.Image) -> Image.Image:
        left, top = self.offset
        if self.kind == "crop":
            right, bottom = left + round(image.width * self.strength), top + round(image.height * self.strength)
            return image.crop((left, top, right, bottom)).resize(image.size, Image.BICUBIC)
        if self.kind == "trim":
            right, bottom = left + int(image.width * self.strength), top + int(image.height * self.strength)
            return image.crop((left, top, right, bottom))
        if self.kind == "rotate":
            return image.rotate(self.strength, resample=Image.BILINEAR, fillcolor=0)
        if self.kind == "flip":
            return ImageOps.mirror(image)
        if self.kind == "brightness":
            return ImageEnhance.Brightness(image).enhance(self.strength)
        if self.kind == "contrast":
            return ImageEnhance.Contrast(image).enhance(self.strength)
        if self.kind == "resize":
            return image.resize((int(self.strength), int(self.strength)), Image.BICUBIC)
        return jpeg_recompressed(image, int(self.strength))


def centred(kind: str, size: tuple[int, int], kept: float) -> Edit:
    """A crop or trim keeping ``kept`` of each side around the centre (one pixel right of it, as a copier's
    rounding would)."""
    width, height = size
    return Edit(kind, kept, ((width - int(width * kept)) // 2 + 1, (height - int(height * kept)) // 2))


def describe(edits: Sequence[Edit]) -> str:
    return "+".join(str(edit) for edit in edits)


def parse_edits(text: str) -> list[Edit]:
    """The edits a ground-truth ``edit`` string names: ``parse_edits(describe(edits)) == edits``."""
    edits = []
    for part in text.split("+") if text else []:
        kind, _, value = part.partition(":")
        if kind == "flip":
            edits.append(Edit("flip"))
        elif kind in ("crop", "trim"):
            kept, _, offset = value.partition("@")
            left, _, top = offset.partition(",")
            edits.append(Edit(kind, float(kept), (int(left), int(top))))
        elif kind in ("rotate", "brightness", "contrast"):
            edits.append(Edit(kind, float(value)))
        elif kind in ("jpeg", "resize"):
            edits.append(Edit(kind, int(value)))
        else:
            raise ValueError(f"unknown edit {part!r} in {text!r}; expected one of {', '.join(KINDS)}")
    return edits


def apply_edits(image: Image.Image, edits: Sequence[Edit]) -> Image.Image:
    for edit in edits:
        image = edit.apply(image)
    return image


def edit_family(edits: Sequence[Edit]) -> str:
    """``geometric`` when one of the edits moved pixels (crop, trim, rotate), else ``photometric`` (a flip
    counts as photometric: copy descriptors are mirror-invariant)."""
    return "geometric" if {edit.kind for edit in edits} & GEOMETRIC_KINDS else "photometric"


def draw_edits(rng: np.random.Generator, size: tuple[int, int], ranges: CopyEditRanges) -> list[Edit]:
    """The edits of one copy of an image of ``size``: ``ranges.edits_per_copy`` kinds of ``DRAWN_KINDS``, in
    that order, strengths rounded as ground truth records them; a brightness change comes with a contrast
    change when ``ranges.contrast`` is set."""
    low, high = ranges.edits_per_copy
    count = int(rng.integers(low, high + 1))
    kinds = [DRAWN_KINDS[i] for i in sorted(rng.choice(len(DRAWN_KINDS), size=count, replace=False))]
    edits = []
    for kind in kinds:
        if kind == "crop":
            kept = round(float(rng.uniform(*ranges.crop_kept)), 2)
            room_x, room_y = (side - round(side * kept) for side in size)
            edits.append(Edit("crop", kept, (int(rng.integers(0, room_x + 1)), int(rng.integers(0, room_y + 1)))))
        elif kind == "rotate":
            degrees = ranges.rotation_degrees
            edits.append(Edit("rotate", round(float(rng.uniform(-degrees, degrees)), 1)))
        elif kind == "flip":
            edits.append(Edit("flip"))
        elif kind == "brightness":
            edits.append(Edit("brightness", round(float(rng.uniform(*ranges.brightness)), 2)))
            if ranges.contrast is not None:
                edits.append(Edit("contrast", round(float(rng.uniform(*ranges.contrast)), 2)))
        else:
            edits.append(Edit("jpeg", int(rng.integers(ranges.jpeg_quality[0], ranges.jpeg_quality[1] + 1))))
    return edits


def write_copy(image: Image.Image, edits: Sequence[Edit], stem: Path) -> Path:
    """Apply the edits and save as ``<stem>.png``, or as ``<stem>.jpg`` at the quality of a final ``jpeg``
    edit: the file's own compression is that edit."""
    quality = int(edits[-1].strength) if edits and edits[-1].kind == "jpeg" else None
    image = apply_edits(image, edits[:-1] if quality is not None else edits)
    if quality is None:
        path = stem.with_suffix(".png")
        image.save(path)
    else:
        path = stem.with_suffix(".jpg")
        image.save(path, "JPEG", quality=quality)
    return path


# The copies the tests and benchmarks plant on real photographs (64 px thumbnails), by name.
WEB_COPIES: dict[str, Callable[[tuple[int, int]], list[Edit]]] = {
    "reencoded": lambda size: [Edit("jpeg", 40)],
    "resized": lambda size: [Edit("resize", 48)],
    "cropped": lambda size: [centred("trim", size, 0.9)],
    "flipped": lambda size: [Edit("flip")],
}


def web_copy(image: Image.Image, name: str) -> Image.Image:
    return apply_edits(image, WEB_COPIES[name](image.size))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(value) for value in rng.integers(0, 256, size=3))


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    hue, saturation, value = image.convert("HSV").split()
    turned = (np.asarray(hue, dtype=np.int16) + round(shift * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(turned.astype(np.uint8)), saturation, value)).convert("RGB")


def training_view(image: Image.Image, rng: np.random.Generator, size: int, edits: DescriptorEdits) -> Image.Image:
    """One training view of ``image`` (RGB), ``size`` x ``size`` pixels: each edit with its probability, so some
    views keep most of the image and some lose most of it."""
    if rng.random() < edits.crop_probability:
        kept = float(rng.uniform(edits.crop_min_kept, 1.0))
        aspect = float(np.exp(rng.uniform(-1, 1) * np.log(edits.aspect_change)))
        image = crop_fraction(image, min(1.0, kept * np.sqrt(aspect)), min(1.0, kept / np.sqrt(aspect)), rng)
    if rng.random() < edits.rotation_probability:
        angle = float(rng.uniform(-edits.rotation_degrees, edits.rotation_degrees))
        fill = (0, 0, 0) if rng.random() < 0.5 else _random_colour(rng)
        image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=fill)
    if rng.random() < edits.flip_probability:
        image = ImageOps.mirror(image)
    if rng.random() < edits.colour_probability:
        image = _colour(image, rng, edits)
    if rng.random() < edits.overlay_probability:
        image = _overlay(image, rng, edits.overlay_size)
    if rng.random() < edits.padding_probability:
        image = _pad(image, rng, edits.padding_max)
    image = image.resize((size, size), Image.BILINEAR)
    if rng.random() < edits.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.1, edits.blur_radius))))
    if rng.random() < edits.jpeg_probability:
        image = jpeg_recompressed(image, int(rng.integers(edits.jpeg_quality[0], edits.jpeg_quality[1] + 1)))
    return image


def _colour(image: Image.Image, rng: np.random.Generator, edits: DescriptorEdits) -> Image.Image:
    low, high = 1 - edits.colour_strength, 1 + edits.colour_strength
    for enhancer in rng.permutation(3):
        kind = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[enhancer]
        image = kind(image).enhance(float(rng.uniform(low, high)))
    if edits.hue_shift > 0:
        image = _shift_hue(image, float(rng.uniform(-edits.hue_shift, edits.hue_shift)))
    if rng.random() < edits.grey_probability:
        image = ImageOps.grayscale(image).convert("RGB")
    return image


def _overlay(image: Image.Image, rng: np.random.Generator, largest: float) -> Image.Image:
    """A line of text or a filled shape (ellipse, box, star-like polygon) somewhere on the image."""
    image = image.copy()
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    extent = max(2, round(side * float(rng.uniform(0.1, largest))))
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


def _pad(image: Image.Image, rng: np.random.Generator, widest: float) -> Image.Image:
    side = min(image.size)
    borders = tuple(round(side * float(rng.uniform(0, widest))) for _ in range(4))
    return ImageOps.expand(image, border=borders, fill=_random_colour(rng))
