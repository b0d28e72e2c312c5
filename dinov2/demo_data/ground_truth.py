"""The record of what the default data planted, and the score of curation against it."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dinov2.copydetect.edits import edit_family, parse_edits

POOL_SOURCE = "pool"
KINDS = ("pool_duplicate", "test_copy", "distractor")
GROUND_TRUTH_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # the planted image's id in the pool manifest
        ("path", pa.string()),  # relative to the output folder
        ("kind", pa.string()),  # one of KINDS
        ("original_id", pa.string()),  # manifest id of what was copied ("" for a distractor)
        ("original", pa.string()),  # path of what was copied, or "mnist:<i>" / "skimage:<name>" / "sklearn:<file>"
        ("edit", pa.string()),  # e.g. "crop:0.87@2,1+flip+jpeg:55"; a resized distractor "resize:<side>"
    ]
)


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


def score_curation(ground_truth: Path, dedup_out: Path, retrieve_out: Path) -> dict[str, float]:
    """How much of the planted material curation found (``curation/...`` metrics).

    - pool duplicates: a planted duplicate is found when self-dedup puts it in one duplicate group with
      its original (recall, also split by edit family, see ``edit_family``). A self-dedup removal (a group
      member other than the group's representative) is right when its group holds another image of its
      family (an original and its planted copies), wrong otherwise (precision);
    - test copies: the share that dedup (self or relative) did not keep, and how many reached the curated set;
    - distractors: their share of the pool, of what dedup kept and of the curated set;
    - unplanted images (the pool's own images from the source) that dedup removed.

    A ratio whose denominator is zero (nothing planted, nothing removed) is left out.
    """
    truth = pq.read_table(ground_truth).to_pylist()
    dedup_out, retrieve_out = Path(dedup_out), Path(retrieve_out)
    pool_images = json.loads((dedup_out / "metrics.json").read_text())["dedup/pool_images"]
    groups = pq.read_table(dedup_out / "duplicate_groups.parquet", columns=["id", "representative"]).to_pylist()
    group_of = {row["id"]: row["representative"] for row in groups}
    kept = set(_ids(dedup_out / "kept.parquet"))
    curated = set(_ids(retrieve_out / "curated.parquet"))
    scores: dict[str, float] = {}

    def share(part: int, whole: int, key: str) -> None:
        if whole:
            scores[key] = part / whole

    duplicates = [row for row in truth if row["kind"] == "pool_duplicate"]

    def found(row: dict) -> bool:
        return row["id"] in group_of and group_of[row["id"]] == group_of.get(row["original_id"])

    family_of = {row["id"]: row["original_id"] for row in duplicates}
    families_in_group: dict[str, list[str]] = {}
    for image_id, group in group_of.items():
        families_in_group.setdefault(group, []).append(family_of.get(image_id, image_id))
    removed = [image_id for image_id, group in group_of.items() if image_id != group]
    right = [i for i in removed if families_in_group[group_of[i]].count(family_of.get(i, i)) > 1]
    scores["curation/pool_duplicates"] = len(duplicates)
    scores["curation/pool_duplicates_found"] = sum(map(found, duplicates))
    scores["curation/self_dedup_removed"] = len(removed)
    share(sum(map(found, duplicates)), len(duplicates), "curation/pool_duplicate_recall")
    share(len(right), len(removed), "curation/pool_duplicate_precision")

    copies = [row for row in truth if row["kind"] == "test_copy"]
    scores["curation/test_copies"] = len(copies)
    scores["curation/test_copies_in_curated"] = sum(row["id"] in curated for row in copies)
    share(sum(row["id"] not in kept for row in copies), len(copies), "curation/test_copies_removed")

    for family in ("photometric", "geometric"):
        rows = [row for row in duplicates if edit_family(parse_edits(row["edit"])) == family]
        share(sum(map(found, rows)), len(rows), f"curation/pool_duplicate_recall_{family}")
        rows = [row for row in copies if edit_family(parse_edits(row["edit"])) == family]
        share(sum(row["id"] not in kept for row in rows), len(rows), f"curation/test_copies_removed_{family}")

    distractors = {row["id"] for row in truth if row["kind"] == "distractor"}
    share(len(distractors), pool_images, "curation/distractor_share_pool")
    share(len(distractors & kept), len(kept), "curation/distractor_share_kept")
    share(len(distractors & curated), len(curated), "curation/distractor_share_curated")

    planted = {row["id"] for row in truth}
    unplanted_removed = (pool_images - len(kept)) - len(planted - kept)
    scores["curation/unplanted_removed"] = unplanted_removed
    share(unplanted_removed, pool_images - len(planted), "curation/unplanted_removed_share")
    return scores
