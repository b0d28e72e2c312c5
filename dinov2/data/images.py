"""Reading image files without letting one bad file stop a run, or one huge file fill the memory.

``read_rgb`` is the project's one way to turn a file into RGB pixels, and it reads every valid mode
as a person would see it, where Pillow's plain ``convert("RGB")`` does not:

- 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) and 32-bit integer grey (``I``, as older Pillow opens
  16-bit PNGs) hold values 0-65535: scaled to 0-255 (``round(v * 255 / 65535)``), where Pillow clips
  everything above 255 to white. ``I`` values outside 0-65535 are refused; float grey (``F``) in [0, 1]
  is scaled by 255, outside it refused;
- transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, palette or grey or RGB images
  with a transparent colour) is composited on a white ``BACKGROUND``, where Pillow drops the alpha and
  shows whatever colour the transparent pixels happen to store (often black);
- ``CMYK`` becomes ``R = 255 (1 - C/255)(1 - K/255)`` (likewise G with M, B with Y), ``1`` (bilevel)
  becomes 0 / 255, palette images their palette colours: Pillow's conversions, pinned by tests.
"""

import errno
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Default pixel limit of the curation stages: well below Pillow's decompression-bomb limit (89.5
# megapixels warns, 179 refuses), far above a 24-megapixel camera photo.
# JPEG decoders can scale by 1/2, 1/4 and 1/8 while decoding (Image.draft), never holding the full image.
_JPEG_DRAFT_SCALES = (2, 4, 8)
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageTooLarge(ValueError):
    """An image over the pixel limit that cannot be decoded at a reduced size."""


@dataclass
class SkippedImages:
    """Files that could not be decoded, kept so a run can report them instead of dying."""

    paths: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.paths.append(str(path))
        self.reasons.append(reason)
        logger.warning("skipping unreadable image %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.paths)


def _limit_pixels(image: Image.Image, max_pixels: int) -> None:
    """Set up a JPEG to decode at 1/2, 1/4 or 1/8 scale so it fits ``max_pixels``; refuse anything else too big."""
    width, height = image.size
    if width * height <= max_pixels:
        return
    if image.format == "JPEG":
        for scale in _JPEG_DRAFT_SCALES:
            reduced = (math.ceil(width / scale), math.ceil(height / scale))
            if reduced[0] * reduced[1] <= max_pixels:
                image.draft(image.mode, reduced)
                break
    if image.size[0] * image.size[1] > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:g} "
            f"(max_pixels), and {image.format} cannot be decoded at a reduced size"
        )


def _sixteen_bit_to_rgb(values: np.ndarray) -> Image.Image:
    # v * 255 / 65535 = v / 257 is never exactly halfway between two integers, so adding half the
    # divisor before the integer division rounds to nearest; uint32 holds 65535 * 255.
    grey = (values.astype(np.uint32) * 255 + 65535 // 2) // 65535
    return Image.fromarray(grey.astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB, as a person sees it (the rules are in the module docstring)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(np.asarray(image))
    if image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer pixels span [{values.min()}, {values.max()}], outside 0-65535")
        return _sixteen_bit_to_rgb(values)
    if image.mode == "F":
        values = np.asarray(image)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError(f"float pixels span [{values.min()}, {values.max()}], outside [0, 1]")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        composited = Image.new("RGB", rgba.size, BACKGROUND)
        composited.paste(rgba, mask=rgba.getchannel("A"))
        return composited
    return image.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with Image.open(path) as image:
        return image.size


def read_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert to RGB with ``to_rgb``.

    Over ``max_pixels``, a JPEG is decoded at the largest of 1/2, 1/4, 1/8 scale that fits, and any
    other image raises ``ImageTooLarge`` before its pixels are decoded.
    """
    with Image.open(path) as image:
        if max_pixels is not None:
            _limit_pixels(image, max_pixels)
        image.load()
        return to_rgb(image)


def grey_thumbnail(image: Image.Image, side: int) -> np.ndarray:
    """(side, side) uint8: the image grey, resized with bicubic filtering (what pixel comparisons of copies use)."""
    return np.asarray(image.convert("L").resize((side, side), Image.BICUBIC))


def try_read_rgb(path: str | Path, skipped: SkippedImages, max_pixels: int | None = None) -> Image.Image | None:
    try:
        return read_rgb(path, max_pixels)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        skipped.add(path, f"{type(error).__name__}: {error}")
        return None


@dataclass
class ImageScan:
    """Image files under a folder, and the entries that looked like images or folders but could not be used."""

    files: list[Path]
    problems: SkippedImages


def _problem(path: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return f"symlink loop: {path} -> {os.readlink(path)} never reaches a file"
    if error.errno == errno.ENOENT and path.is_symlink():
        return f"broken symlink: {path} -> {os.readlink(path)} does not exist"
    return f"{type(error).__name__}: {error.strerror}"


def scan_images(folder: str | Path) -> ImageScan:
    """Image files under a folder, recursively, in a stable order; symlinked folders are followed.

    A symlink that loops, a symlink to a folder already listed (one leading back to an ancestor is a
    loop, one to a folder reached by another path would list its images twice), a broken symlink with
    an image suffix and a folder that cannot be read are recorded in ``problems`` with the reason
    instead of being dropped without a word.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files: list[Path] = []
    problems = SkippedImages()
    listed = {(folder.stat().st_dev, folder.stat().st_ino): folder}
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            names = sorted(os.listdir(directory))
        except OSError as error:
            problems.add(directory, _problem(directory, error))
            continue
        for name in names:
            path = directory / name
            is_image_name = path.suffix.lower() in IMAGE_SUFFIXES
            try:
                info = path.stat()
            except OSError as error:
                if is_image_name or error.errno == errno.ELOOP:
                    problems.add(path, _problem(path, error))
                continue
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in listed:
                    earlier = listed[key]
                    reason = "symlink loop: leads back to" if earlier in path.parents else "same folder as"
                    problems.add(path, f"{reason} {earlier}, listed once")
                    continue
                listed[key] = path
                pending.append(path)
            elif is_image_name and stat.S_ISREG(info.st_mode):
                files.append(path)
            elif is_image_name:
                problems.add(path, "not a regular file")
    return ImageScan(sorted(files), problems)


def list_images(folder: str | Path) -> list[Path]:
    """Image files under a folder, recursively, in a stable order (see ``scan_images``)."""
    files = scan_images(folder).files
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files
