"""Reading image files without letting one bad file stop a run."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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


def read_rgb(path: str | Path) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def try_read_rgb(path: str | Path, skipped: SkippedImages) -> Image.Image | None:
    try:
        return read_rgb(path)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        skipped.add(path, f"{type(error).__name__}: {error}")
        return None


def list_images(folder: str | Path) -> list[Path]:
    """Image files under a folder, recursively, in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files
