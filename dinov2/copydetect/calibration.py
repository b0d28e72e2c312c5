"""Dedup thresholds of a descriptor, measured on copies made for the purpose: no labels needed.

The inputs are descriptors of M held-out pool images ("originals"), of one synthetic copy of each
(``stage.calibration_copies``, each at a recorded strength) and of other pool images:

- self-dedup: every pair among the 2M originals and copies is scored; an original with its own copy is
  a true pair, every other pair a false one. The self threshold is the lowest cosine whose pairs above
  it reach ``precision_target`` (the highest recall at that precision);
- relative dedup: the originals play the evaluation images, the copies and the other pool images the
  pool. A copy is removed when its cosine to its original reaches the threshold; an other pool image is
  falsely removed when its cosine to any original does. The relative threshold is the lowest cosine at
  which at most ``false_removal_target`` of the other pool images are removed. The share grows with the
  number of evaluation images, so it is stated for M originals.

A real pool already holds copies of its own images, which these measurements count as false pairs: the
precision is a lower bound. A pool image that the descriptor links to an original at the self threshold
is not counted as a false removal (relative dedup removing it is right when that link is), so the
relative threshold never exceeds the self threshold.

Descriptors are rounded to float16 first, as ``dinov2 embed`` stores them, so the thresholds hold for the
stored vectors.
"""

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Calibration:
    self_threshold: float
    self_precision: float  # of the pairs at or above the self threshold, the share that are true pairs
    self_recall: dict[str, float]  # true pairs at or above it: "all" and per copy strength
    relative_threshold: float
    relative_recall: dict[str, float]  # copies whose cosine to their original reaches the relative threshold
    relative_false_removal: float  # share of the other pool images within it of any original
    originals: int
    pool_images: int
    true_pairs_above_self: int = 0
    false_pairs_above_self: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _stored(vectors: np.ndarray) -> np.ndarray:
    return np.asarray(vectors, dtype=np.float16).astype(np.float32)


def _recall_by_strength(found: np.ndarray, strengths: np.ndarray) -> dict[str, float]:
    recall = {"all": float(found.mean()) if len(found) else 0.0}
    for strength in sorted(set(strengths.tolist())):
        recall[strength] = float(found[strengths == strength].mean())
    return recall


def self_dedup_curve(originals: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair among originals and copies, by decreasing cosine: (cosines, true-pair flags, true pairs
    at or above, false pairs at or above)."""
    count = len(originals)
    vectors = np.concatenate([originals, copies])
    first, second = np.triu_indices(2 * count, 1)
    cosines = (vectors @ vectors.T)[first, second]
    true_pair = second - first == count
    order = np.argsort(-cosines, kind="stable")
    cosines, true_pair = cosines[order], true_pair[order]
    return cosines, true_pair, np.cumsum(true_pair), np.cumsum(~true_pair)


def choose_self_threshold(
    cosines: np.ndarray, true_above: np.ndarray, false_above: np.ndarray, precision_target: float
) -> int:
    """Index (into the sorted pairs) of the lowest cosine whose pairs at or above reach the precision target;
    -1 when even the highest pair does not. Tied cosines count together: the index is the last of its tie."""
    precision = true_above / (true_above + false_above)
    last_of_tie = np.append(cosines[1:] != cosines[:-1], True)
    meeting = np.flatnonzero((precision >= precision_target) & last_of_tie)
    return int(meeting.max()) if len(meeting) else -1


def choose_relative_threshold(nearest_original: np.ndarray, false_removal_target: float) -> float:
    """The lowest cosine at which at most ``false_removal_target`` of the pool images reach an original."""
    allowed = int(np.floor(false_removal_target * len(nearest_original)))
    ordered = np.sort(nearest_original)[::-1]
    if allowed >= len(ordered):
        return float(ordered[-1])
    # Above the (allowed + 1)-th highest cosine, exactly `allowed` images (or fewer, with ties) are removed.
    return float(np.nextafter(np.float32(ordered[allowed]), np.float32(2)))


def calibrate(
    originals: np.ndarray,
    copies: np.ndarray,
    strengths: list[str],
    pool: np.ndarray,
    precision_target: float,
    false_removal_target: float,
) -> Calibration:
    """Self and relative thresholds from descriptors of originals, their copies (row i copies row i) and
    other pool images."""
    if len(originals) != len(copies) or len(originals) != len(strengths):
        raise ValueError(f"{len(originals)} originals, {len(copies)} copies and {len(strengths)} strengths differ")
    if len(originals) < 2:
        raise ValueError(f"calibration needs at least 2 originals, got {len(originals)}")
    originals, copies, pool = _stored(originals), _stored(copies), _stored(pool)
    strengths_array = np.asarray(strengths)
    notes = []

    cosines, true_pair, true_above, false_above = self_dedup_curve(originals, copies)
    index = choose_self_threshold(cosines, true_above, false_above, precision_target)
    if index < 0:
        # No cosine reaches the target: the threshold sits above every pair and self-dedup links nothing.
        self_threshold = float(np.nextafter(np.float32(cosines[0]), np.float32(2)))
        true_count = false_count = 0
        notes.append(f"no threshold reaches self-dedup precision {precision_target}: nothing is linked")
    else:
        self_threshold = float(cosines[index])
        true_count, false_count = int(true_above[index]), int(false_above[index])
    own = np.einsum("ij,ij->i", originals, copies)
    self_precision = true_count / (true_count + false_count) if true_count + false_count else 1.0

    nearest = (pool @ originals.T).max(axis=1) if len(pool) else np.zeros(0, dtype=np.float32)
    # A pool image linked to an original at the self threshold is that original's copy: removing it is right.
    # The others all lie below the self threshold, so the relative threshold never exceeds it.
    counted = nearest < self_threshold
    if (~counted).any():
        notes.append(
            f"{int((~counted).sum())} pool images linked to an original at the self threshold are counted as its "
            "copies, not as false removals"
        )
    candidates = nearest[counted]
    relative_threshold = choose_relative_threshold(candidates, false_removal_target) if len(candidates) else 0.0
    false_removal = float((candidates >= relative_threshold).mean()) if len(candidates) else 0.0
    return Calibration(
        self_threshold=self_threshold,
        self_precision=self_precision,
        self_recall=_recall_by_strength(own >= self_threshold, strengths_array),
        relative_threshold=relative_threshold,
        relative_recall=_recall_by_strength(own >= relative_threshold, strengths_array),
        relative_false_removal=false_removal,
        originals=len(originals),
        pool_images=len(pool),
        true_pairs_above_self=true_count,
        false_pairs_above_self=false_count,
        notes=notes,
    )
