"""Which image of a duplicate group self-dedup keeps: the best copy, not the first path.

Near-duplicates on the web are mostly degraded copies of one original: downscaled, recompressed,
cropped. Keeping the first path in sort order keeps whichever copy happens to have the smaller name,
usually a degraded one. The representative is therefore the member with the most pixels (width x
height from the manifest); among equal pixel counts the largest file (the least compressed); among
equal files the first path, so the choice never depends on the search backend.
"""

import numpy as np


def preference_order(pixels: np.ndarray, size_bytes: np.ndarray, paths: list[str]) -> np.ndarray:
    """``rank[i]``: place of image i when images are ordered best first (most pixels, largest file, path)."""
    pixels = np.asarray(pixels, dtype=np.int64)
    size_bytes = np.asarray(size_bytes, dtype=np.int64)
    if not len(pixels) == len(size_bytes) == len(paths):
        raise ValueError(f"{len(pixels)} pixel counts, {len(size_bytes)} file sizes and {len(paths)} paths differ")
    path_rank = np.argsort(np.argsort(np.asarray(paths, dtype=str), kind="stable"), kind="stable")
    best_first = np.lexsort((path_rank, -size_bytes, -pixels))
    rank = np.empty(len(pixels), dtype=np.int64)
    rank[best_first] = np.arange(len(pixels))
    return rank


def kept_reason(members: np.ndarray, rank: np.ndarray, pixels: np.ndarray, size_bytes: np.ndarray) -> str:
    """Why the best-ranked member of a group (two or more images) beat the runner-up.

    ``most_pixels``, ``largest_file`` (same pixel count) or ``first_path`` (same pixels and file size).
    """
    best, runner_up = members[np.argsort(rank[members], kind="stable")[:2]]
    if pixels[best] != pixels[runner_up]:
        return "most_pixels"
    if size_bytes[best] != size_bytes[runner_up]:
        return "largest_file"
    return "first_path"
