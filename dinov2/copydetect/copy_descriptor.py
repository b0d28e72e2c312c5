"""A copy-detection descriptor that needs no training: what self-dedup uses when no SSCD-like model exists.

The paper deduplicates with SSCD copy-detection embeddings, which cannot be downloaded here. This
descriptor is an honest stand-in for finding re-encoded, resized, slightly cropped and mirrored copies:

- layout: the low-frequency 2-D DCT of the image at 32x32 in an opponent colour space (grey, red-green,
  blue-yellow). The image is first averaged with its mirror, so a flipped copy has the same descriptor;
  the coefficients that survive are the horizontally even ones. DC terms are dropped (brightness shifts)
  and each coefficient is multiplied by its radial frequency, a fixed whitening of the 1/f spectrum
  of natural images, so the smooth layout shared by many photos does not dominate the cosine.
- colours: a joint 8x8x8 RGB histogram, square-rooted (Hellinger) and mean-centred; robust to crops and
  resizes, and it separates images whose layouts happen to match.

Both parts are L2-normalised and concatenated with weights 0.4 and 0.6 (of the squared norm), so the
cosine of two descriptors is 0.4 x layout cosine + 0.6 x colour cosine. Its thresholds were measured on
planted copies of CIFAR-10 (benchmarks/curation/README.md) and are far from SSCD's 0.6: dedup thresholds
are a property of the embedder (``COPY_DESCRIPTOR_THRESHOLDS``).
"""

import numpy as np
from PIL import Image
from scipy.fft import dctn

SIDE = 32
LOW_FREQUENCIES = 8
HISTOGRAM_BINS = 8
LAYOUT_WEIGHT = 0.4
COPY_DESCRIPTOR_DIM = 3 * LOW_FREQUENCIES * (LOW_FREQUENCIES // 2) + HISTOGRAM_BINS**3
COPY_DESCRIPTOR_THRESHOLDS = {"self": 0.825, "relative": 0.75}

_frequency = np.arange(LOW_FREQUENCIES)
_WHITENING = np.sqrt(_frequency[:, None] ** 2 + _frequency[None, :] ** 2)[:, ::2].ravel()
# Chrominance carries less of an image's identity than luminance: half weight.
_CHANNEL_WEIGHTS = (1.0, 0.5, 0.5)
# Every number that shapes the descriptor: its fingerprint in embeddings.json hashes these.
COPY_DESCRIPTOR_SETTINGS = (SIDE, LOW_FREQUENCIES, HISTOGRAM_BINS, LAYOUT_WEIGHT, _CHANNEL_WEIGHTS)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / max(float(np.linalg.norm(vector)), 1e-8)


def layout_part(pixels: np.ndarray) -> np.ndarray:
    symmetric = (pixels + pixels[:, ::-1]) / 2
    red, green, blue = symmetric[..., 0], symmetric[..., 1], symmetric[..., 2]
    channels = ((red + green + blue) / 3, red - green, red + green - 2 * blue)
    parts = [
        dctn(channel, norm="ortho")[:LOW_FREQUENCIES, :LOW_FREQUENCIES][:, ::2].ravel() * _WHITENING * weight
        for channel, weight in zip(channels, _CHANNEL_WEIGHTS, strict=True)
    ]
    return _unit(np.concatenate(parts))


def colour_part(pixels_uint8: np.ndarray) -> np.ndarray:
    quantised = pixels_uint8.astype(np.int64) // (256 // HISTOGRAM_BINS)
    code = (quantised[..., 0] * HISTOGRAM_BINS + quantised[..., 1]) * HISTOGRAM_BINS + quantised[..., 2]
    histogram = np.bincount(code.ravel(), minlength=HISTOGRAM_BINS**3).astype(np.float64)
    hellinger = np.sqrt(histogram / histogram.sum())
    return _unit(hellinger - hellinger.mean())


def copy_descriptor(image: Image.Image) -> np.ndarray:
    """The unit-norm float32 descriptor of one image (``COPY_DESCRIPTOR_DIM`` values)."""
    small = np.asarray(image.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR))
    layout = layout_part(small.astype(np.float64) / 255.0)
    colour = colour_part(small)
    descriptor = np.concatenate([layout * np.sqrt(LAYOUT_WEIGHT), colour * np.sqrt(1 - LAYOUT_WEIGHT)])
    return _unit(descriptor).astype(np.float32)
