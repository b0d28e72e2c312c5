"""Which image of a duplicate group self-dedup keeps: the best copy, not the first path.

Near-duplicates are mostly degraded copies of one original: downscaled, recompressed, cropped.
Keeping the first path in sort order keeps whichever copy happens to have the smaller name. The
representative is therefore, in this order:

1. the member with the most pixels (width x height from the manifest): downscaled copies lose;
2. a losslessly stored file (PNG, BMP, TIFF) before a lossy one (JPEG, WebP, GIF's 256 colours): a
   re-encoded copy loses;
3. between lossy files, the largest: at the same pixel count, the least compressed. File sizes of
   lossless files are not compared, nor across the two kinds: there a size says how much detail or
   noise an image holds, not how degraded it is (a PNG original is smaller than its JPEG re-encoding
   at 28 x 28 pixels, a rotated copy larger than its original);
4. the first path, so the choice never depends on the search backend.
"""

from pathlib import PurePath

import numpy as np

LOSSLESS_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


def _lossy(paths: list[str]) -> np.ndarray:
    return np.array([PurePath(path).suffix.lower() not in LOSSLESS_SUFFIXES for path in paths], dtype=bool)


def preference_order(pixels: np.ndarray, size_bytes: np.ndarray, paths: list[str]) -> np.ndarray:
    """``rank[i]``: place of image i when images are ordered best copy first (the rules above)."""
    pixels = np.asarray(pixels, dtype=np.int64)
    size_bytes = np.asarray(size_bytes, dtype=np.int64)
    if not len(pixels) == len(size_bytes) == len(paths):
        raise ValueError(f"{len(pixels)} pixel counts, {len(size_bytes)} file sizes and {len(paths)} paths differ")
    lossy = _lossy(paths)
    path_rank = np.argsort(np.argsort(np.asarray(paths, dtype=str), kind="stable"), kind="stable")
    best_first = np.lexsort((path_rank, -np.where(lossy, size_bytes, 0), lossy, -pixels))
    rank = np.empty(len(pixels), dtype=np.int64)
    rank[best_first] = np.arange(len(pixels))
    return rank


def kept_reason(
    members: np.ndarray, rank: np.ndarray, pixels: np.ndarray, size_bytes: np.ndarray, paths: list[str]
) -> str:
    """Why the best-ranked member of a group (two or more images) beat the runner-up.

    ``most_pixels``, ``lossless_file`` (same pixels, the runner-up is lossy), ``largest_file`` (same
    pixels, both lossy) or ``first_path`` (nothing else told them apart).
    """
    best, runner_up = members[np.argsort(rank[members], kind="stable")[:2]]
    lossy = _lossy([paths[best], paths[runner_up]])
    if pixels[best] != pixels[runner_up]:
        return "most_pixels"
    if lossy[0] != lossy[1]:
        return "lossless_file"
    if lossy[0] and size_bytes[best] != size_bytes[runner_up]:
        return "largest_file"
    return "first_path"
