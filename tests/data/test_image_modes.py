"""read_rgb decodes every image mode to the RGB a person sees: pixel values worked out by hand on 2x2 files."""

import numpy as np
import pytest
from PIL import Image

from dinov2.data.datasets import ImageFolderDataset
from dinov2.data.images import SkippedImages, read_rgb, to_rgb, try_read_rgb


def saved(image: Image.Image, path, **options) -> np.ndarray:
    """Write the image to a real file, read it back with read_rgb: (H, W, 3) uint8."""
    image.save(path, **options)
    rgb = read_rgb(path)
    assert rgb.mode == "RGB"
    return np.asarray(rgb)


def grey(values: np.ndarray) -> list[list[int]]:
    """The single grey level of each pixel, checking that R = G = B."""
    assert (values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()
    return values[..., 0].tolist()


SIXTEEN_BIT = np.array([[0, 256], [32768, 65535]])
# round(v * 255 / 65535): 256 -> 0.996 -> 1, 32768 -> 127.502 -> 128.
SIXTEEN_BIT_AS_8 = [[0, 1], [128, 255]]


def test_full_range_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    image = Image.fromarray(SIXTEEN_BIT.astype(np.uint16))
    assert image.mode == "I;16"
    assert grey(saved(image, tmp_path / "grey16.png")) == SIXTEEN_BIT_AS_8


def test_32_bit_integer_grey_with_16_bit_values_is_scaled_the_same_way(tmp_path):
    image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert image.mode == "I"
    assert grey(saved(image, tmp_path / "grey32.tif")) == SIXTEEN_BIT_AS_8


def test_big_endian_16_bit_grey_is_scaled_like_little_endian():
    image = Image.frombytes("I;16B", (2, 2), SIXTEEN_BIT.astype(">u2").tobytes())
    assert grey(np.asarray(to_rgb(image))) == SIXTEEN_BIT_AS_8


def test_integer_pixels_beyond_16_bits_are_refused_with_their_range(tmp_path):
    Image.fromarray(np.array([[0, 70000], [5, 6]], dtype=np.int32)).save(tmp_path / "wide.tif")
    skipped = SkippedImages()
    assert try_read_rgb(tmp_path / "wide.tif", skipped) is None
    assert skipped.reasons == ["ValueError: 32-bit integer pixels span [0, 70000], outside 0-65535"]


def test_float_grey_in_zero_one_is_scaled_by_255(tmp_path):
    image = Image.fromarray(np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    assert grey(saved(image, tmp_path / "float.tif")) == [[0, 128], [64, 255]]  # 127.5 and 63.75 rounded


def palette_image() -> Image.Image:
    image = Image.new("P", (2, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])  # 0 red, 1 green, 2 blue
    image.putdata([0, 1, 2, 0])
    return image


def test_palette_images_show_their_palette_colours(tmp_path):
    rgb = saved(palette_image(), tmp_path / "palette.png")
    assert rgb.tolist() == [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 0, 0]]]


def test_a_transparent_palette_entry_is_composited_on_white(tmp_path):
    rgb = saved(palette_image(), tmp_path / "palette_key.png", transparency=1)
    assert rgb.tolist() == [[[255, 0, 0], [255, 255, 255]], [[0, 0, 255], [255, 0, 0]]]


def test_palette_alpha_per_entry_is_blended_with_white(tmp_path):
    # Red opaque, green at alpha 128: (0 * 128 + 255 * 127) / 255 = 127 for red and blue; blue fully transparent.
    rgb = saved(palette_image(), tmp_path / "palette_alpha.png", transparency=bytes([255, 128, 0]))
    assert rgb.tolist() == [[[255, 0, 0], [127, 255, 127]], [[255, 255, 255], [255, 0, 0]]]


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    # (grey, alpha): (0, 0) -> 255; (0, 255) -> 0; (0, 128) -> 255 * 127 / 255 = 127;
    # (200, 51) -> (200 * 51 + 255 * 204) / 255 = 244.
    pixels = np.array([[[0, 0], [0, 255]], [[0, 128], [200, 51]]], dtype=np.uint8)
    assert grey(saved(Image.fromarray(pixels, "LA"), tmp_path / "la.png")) == [[255, 0], [127, 244]]


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.array([[[255, 0, 0, 128], [0, 0, 255, 0]]], dtype=np.uint8)
    rgb = saved(Image.fromarray(pixels, "RGBA"), tmp_path / "rgba.png")
    assert rgb.tolist() == [[[255, 127, 127], [255, 255, 255]]]


def test_a_transparent_grey_level_is_composited_on_white(tmp_path):
    image = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8))
    assert grey(saved(image, tmp_path / "grey_key.png", transparency=100)) == [[0, 255], [200, 255]]


def test_cmyk_becomes_rgb_by_subtracting_ink(tmp_path):
    # R = 255 (1 - C/255)(1 - K/255): no ink is white, full cyan has no red, C = K = 128 gives 255 * 127/255
    # * 127/255 = 63 red and 127 green / blue, full black is black.
    pixels = np.array([[[0, 0, 0, 0], [255, 0, 0, 0]], [[128, 0, 0, 128], [0, 0, 0, 255]]], dtype=np.uint8)
    rgb = saved(Image.fromarray(pixels, "CMYK"), tmp_path / "cmyk.tif")
    assert rgb.tolist() == [[[255, 255, 255], [0, 255, 255]], [[63, 127, 127], [0, 0, 0]]]


@pytest.mark.parametrize("suffix", ["png", "bmp", "tif"])
def test_bilevel_images_are_black_and_white(tmp_path, suffix):
    image = Image.fromarray(np.array([[False, True], [True, False]]))
    assert image.mode == "1"
    assert grey(saved(image, tmp_path / f"bilevel.{suffix}")) == [[0, 255], [255, 0]]


def test_the_pretraining_dataset_decodes_a_huge_jpeg_small_and_skips_a_huge_png(tmp_path):
    huge = Image.new("RGB", (7000, 6000), (10, 200, 30))  # 42 megapixels, over the 40-megapixel limit
    huge.save(tmp_path / "huge.jpg", quality=80)
    huge.save(tmp_path / "huge.png")
    dataset = ImageFolderDataset(tmp_path)
    image, label = dataset[0]
    assert image.size == (3500, 3000) and label == -1  # decoded at half scale
    assert dataset[1] is None
    assert dataset.skipped.reasons == [
        "ImageTooLarge: 7000x6000 is 42.0 megapixels, over the limit of 40 (max_pixels), "
        "and PNG cannot be decoded at a reduced size"
    ]
