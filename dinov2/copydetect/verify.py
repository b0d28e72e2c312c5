"""Pixel verification of candidate duplicate pairs: align one image onto the other, then correlate.

A copy-detection descriptor ranks pairs well but, on small images of similar objects, no cosine separates
edited copies from look-alikes (Fashion-MNIST at 28 px: a cropped, rotated copy is often further from its
original in the descriptor than two different pairs of trousers are from each other). A copy, though, is
its original up to a geometric edit and a change of tone: undo the edit and the pixels agree.

``aligned_correlation`` does that for a batch of pairs at once. Both images are turned grey and resized
to ``side`` x ``side``; one is warped onto the other by a similarity transform (scale, rotation, shift),
fitted by gradient descent on the normalised cross-correlation (first on slightly blurred images, then
on the pixels), with and without a mirror, in both directions; the score is the best correlation found.
The normalisation makes it blind to brightness and contrast, and the fit covers crops (a crop resized
back is a zoom), small rotations and mirrors; the warp is masked outside the rotated canvas, where a rotated
copy is black. The score is in [-1, 1]: on the default data a copy scores close to 1 with its original,
different garments lower (``benchmarks/curation/README.md`` has the measured separation).

``verify_pairs`` is dedup's verification step: given the candidate edges of the k-NN graph and the image of
each row, it reads each image once, scores each pair of images once and keeps the edges that hold.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.configuration.curation import VerifyParams
from dinov2.data.images import grey_thumbnail, read_rgb

logger = logging.getLogger(__name__)
BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16  # the 3 x 3 binomial kernel


def grey_thumbnails(paths: Sequence[str | Path], side: int) -> torch.Tensor:
    """(N, side, side) uint8 grey images, read with the project's image reader (784 bytes each at 28 px)."""
    thumbnails = [grey_thumbnail(read_rgb(path), side) for path in paths]
    return torch.from_numpy(np.stack(thumbnails)) if thumbnails else torch.zeros(0, side, side, dtype=torch.uint8)


def _correlation(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    first, second = first.flatten(1), second.flatten(1)
    first = first - first.mean(1, keepdim=True)
    second = second - second.mean(1, keepdim=True)
    return (first * second).sum(1) / (first.norm(dim=1) * second.norm(dim=1) + 1e-6)


def _blur(images: torch.Tensor) -> torch.Tensor:
    return F.conv2d(images[:, None], BLUR[None, None], padding=1)[:, 0]


def _frame(rotation: torch.Tensor, side: int) -> torch.Tensor:
    """(N, side, side): where the canvas, turned by ``rotation`` about its centre, covers each pixel (1 inside,
    0 outside, the bilinear ramp between). A copy rotated by an editor is black outside its turned frame, so
    the warp of the original is masked the same way; without the mask a rotated copy of a garment that fills
    its canvas loses its corners to the comparison (0.94-0.97 where the copy itself would score 1)."""
    centres = (torch.arange(side, dtype=rotation.dtype) * 2 + 1) / side - 1  # pixel centres in [-1, 1]
    x, y = centres[None, None, :], centres[None, :, None]
    cos, sin = rotation.cos()[:, None, None], rotation.sin()[:, None, None]

    def inside(coordinate: torch.Tensor) -> torch.Tensor:  # bilinear weight of in-canvas pixels, per axis
        position = ((coordinate + 1) * side - 1) / 2
        return (position + 1).clamp(0, 1) * (side - position).clamp(0, 1)

    return inside(cos * x - sin * y) * inside(sin * x + cos * y)


def _fit(fixed: torch.Tensor, moving: torch.Tensor, search: VerifyParams) -> torch.Tensor:
    """The best correlation of ``fixed`` with ``moving`` warped by a similarity transform, per pair."""
    count, side, steps = len(fixed), fixed.shape[-1], search.steps
    log_scale = torch.zeros(count, requires_grad=True)
    rotation = torch.zeros(count, requires_grad=True)
    shift = torch.zeros(count, 2, requires_grad=True)
    optimizer = torch.optim.Adam([log_scale, rotation, shift], lr=search.learning_rate)
    fixed_blurred = _blur(fixed)

    def warp() -> torch.Tensor:
        scale = torch.exp(log_scale)
        cos, sin = torch.cos(rotation) * scale, torch.sin(rotation) * scale
        theta = torch.stack(
            [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
        )  # fmt: skip
        grid = F.affine_grid(theta, [count, 1, side, side], align_corners=False)
        warped = F.grid_sample(moving[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]
        # the mask follows the fitted rotation without steering it (as good a fit, 15% less work)
        return warped * _frame(rotation.detach(), side)

    for step in range(steps):
        warped = warp()
        if step < steps // 2:
            loss = (1 - _correlation(fixed_blurred, _blur(warped))).sum()
        else:
            loss = (1 - _correlation(fixed, warped)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            log_scale.clamp_(-search.max_log_scale, search.max_log_scale)
            rotation.clamp_(-search.max_rotation, search.max_rotation)
            shift.clamp_(-search.max_shift, search.max_shift)
    with torch.no_grad():
        return _correlation(fixed, warp())


def aligned_correlation(first: torch.Tensor, second: torch.Tensor, search: VerifyParams) -> torch.Tensor:
    """Per pair of (N, side, side) grey images: the best correlation over similarity transforms (within the
    bounds of ``search``), mirrors and the direction of the warp."""
    if first.shape != second.shape or first.dim() != 3:
        raise ValueError(
            f"expected two (N, side, side) batches of the same shape, got {first.shape} and {second.shape}"
        )
    if len(first) == 0:
        return torch.zeros(0)
    with torch.enable_grad():
        scores = [
            _fit(fixed, moving, search)
            for fixed, moving in ((first, second), (first, second.flip(-1)), (second, first), (second, first.flip(-1)))
        ]
    return torch.stack(scores).max(0).values


def verified_edges(
    edges: np.ndarray, thumbnail: Callable[[np.ndarray], torch.Tensor], threshold: float, search: VerifyParams
) -> tuple[np.ndarray, np.ndarray]:
    """The edges (E, 2) whose two images' aligned correlation reaches ``threshold``, and every edge's score.
    ``thumbnail(rows)`` returns the grey thumbnails of those rows; an edge and its reverse are scored once."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    pairs, inverse = np.unique(np.sort(edges, axis=1), axis=0, return_inverse=True)
    scores = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), search.batch_pairs):
        chunk = pairs[start : start + search.batch_pairs]
        rows, local = np.unique(chunk, return_inverse=True)
        images = thumbnail(rows)
        local = local.reshape(chunk.shape)
        scores[start : start + len(chunk)] = aligned_correlation(
            images[local[:, 0]], images[local[:, 1]], search
        ).numpy()
    edge_scores = scores[inverse.reshape(-1)] if len(edges) else scores
    return edges[edge_scores >= threshold], edge_scores


def verify_pairs(
    edges: np.ndarray, paths: Sequence[str], params: VerifyParams, relative: bool
) -> tuple[np.ndarray, dict[str, int]]:
    """The candidate edges (E, 2) of a graph whose row i is the image ``paths[i]`` that hold, and the image
    pairs scored and kept. Each image is read once and each pair of images scored once: an image is in many
    pairs, and an evaluation image is also the row of each of its views. ``relative`` (pool-evaluation pairs)
    takes ``relative_threshold`` and adds the distinct-match rule."""
    kind = "relative" if relative else "self"
    threshold = params.relative_threshold if relative and params.relative_threshold is not None else params.threshold
    distinct_threshold = params.distinct_threshold if relative else None
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    rows = np.unique(edges)
    distinct = sorted({paths[row] for row in rows})
    images = grey_thumbnails(distinct, params.side)
    position = {path: n for n, path in enumerate(distinct)}
    image_of = np.zeros(rows.max() + 1 if len(rows) else 0, dtype=np.int64)
    image_of[rows] = [position[paths[row]] for row in rows]
    pairs, inverse = np.unique(np.sort(image_of[edges], axis=1), axis=0, return_inverse=True)
    _, scores = verified_edges(pairs, lambda chosen: images[chosen].float() / 255, threshold, params)
    holds = scores >= threshold
    if distinct_threshold is not None:
        holds |= (scores >= distinct_threshold) & distinct_matches(pairs, scores, params.distinct_margin)
    counts = {f"dedup/{kind}_candidate_pairs": len(pairs), f"dedup/{kind}_verified_pairs": int(holds.sum())}
    logger.info(
        "%s dedup: %d of %d candidate image pairs verified (aligned pixel correlation >= %s%s)",
        kind, counts[f"dedup/{kind}_verified_pairs"], len(pairs), threshold,
        "" if distinct_threshold is None
        else f", or >= {distinct_threshold} for a distinct match leading by {params.distinct_margin}",
    )  # fmt: skip
    return edges[holds[inverse.reshape(-1)]], counts


def distinct_matches(pairs: np.ndarray, scores: np.ndarray, margin: float) -> np.ndarray:
    """Mask over (P, 2) image pairs: the pair is the best-scoring pair of each of its two images, ahead of that
    image's next-best pair by ``margin`` or more (an image in no other pair has no rival). A copy matches its
    original and little else as well; a look-alike has rivals (the ratio test of feature matching)."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(pairs) != len(scores):
        raise ValueError(f"expected a score per pair, got {len(scores)} scores for {len(pairs)} pairs")
    if not len(pairs):
        return np.zeros(0, dtype=bool)
    images, inverse = np.unique(pairs, return_inverse=True)
    ends = inverse.reshape(-1, 2)
    best = np.full(len(images), -np.inf)
    np.maximum.at(best, ends[:, 0], scores)
    np.maximum.at(best, ends[:, 1], scores)
    # the runner-up of each image: its best score among pairs other than one pair that holds its best
    holder = np.full(len(images), -1)
    for column in (0, 1):
        at_best = np.flatnonzero(scores == best[ends[:, column]])
        holder[ends[at_best, column]] = at_best
    runner_up = np.full(len(images), -np.inf)
    for column in (0, 1):
        others = np.flatnonzero(holder[ends[:, column]] != np.arange(len(pairs)))
        np.maximum.at(runner_up, ends[others, column], scores[others])
    leads = []
    for column in (0, 1):
        end = ends[:, column]
        leads.append(np.where(holder[end] == np.arange(len(pairs)), scores - runner_up[end], -np.inf))
    return (leads[0] >= margin) & (leads[1] >= margin)
