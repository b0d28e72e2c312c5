"""The edits a copy of a web image typically went through, and the real photographs the copy tests plant them on.

A module of its own (not conftest.py) so test files and benchmarks can import it by a name no other test
folder uses.
"""

import io

import numpy as np
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


COPY_EDITS = {
    "reencoded": reencoded,
    "resized": lambda image: image.resize((48, 48), Image.BICUBIC),
    "cropped": cropped,
    "flipped": ImageOps.mirror,
}

# Every distinct photograph shipped with scikit-image and scikit-learn, colour first. Left out: chelsea's
# twin `cat`, the right image of the stereo pair, drawings and synthetic patterns, and hubble_deep_field,
# which is mostly black like a digit or a Fashion-MNIST item on its background.
COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "immunohistochemistry", "retina", "rocket", "motorcycle", "china",
                 "flower")  # fmt: skip
GREY_PHOTOS = ("camera", "moon", "coins", "page", "text", "clock", "cell", "brick", "grass", "gravel")


def _photo_pixels(name: str) -> np.ndarray:
    import skimage.data
    from sklearn.datasets import load_sample_images

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    if name in ("china", "flower"):
        return load_sample_images().images[("china", "flower").index(name)]
    return getattr(skimage.data, name)()


def photo_thumbnails(side: int = 64) -> dict[str, Image.Image]:
    """The 19 photographs as RGB thumbnails: the centred square, resized to `side` pixels."""
    thumbnails = {}
    for name in COLOUR_PHOTOS + GREY_PHOTOS:
        image = Image.fromarray(_photo_pixels(name)).convert("RGB")
        width, height = image.size
        square = min(width, height)
        left, top = (width - square) // 2, (height - square) // 2
        thumbnails[name] = image.crop((left, top, left + square, top + square)).resize((side, side), Image.BICUBIC)
    return thumbnails
