"""Manifests: Parquet tables that name every image of a source once.

Columns: ``id`` (unique within the manifest), ``path``, ``content_hash`` (SHA-256 of the file bytes),
``size_bytes``, ``width``, ``height``, ``source``, ``split`` and ``label`` (empty when unknown).
Building a manifest decodes every file (a JPEG over ``max_pixels`` at a reduced size, any other image
over it not at all), so an unreadable one is recorded (in the returned ``unreadable`` table, with the
symlink loops, broken symlinks and unreadable folders met while listing) instead of failing later inside
an embedding job, and byte-identical files are collapsed to the first one in path order, counted in
``exact_duplicates``. ``width`` and ``height`` are the file's own, read from its header.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from dinov2.atomic import output_folder, write_json, write_table
from dinov2.configuration.curation import DEFAULT_MAX_PIXELS, PrepareParams
from dinov2.data.images import IMAGE_SUFFIXES, SkippedImages, image_size, scan_images, try_read_rgb

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("content_hash", pa.string()),
        ("size_bytes", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
    ]
)
UNREADABLE_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
SPLITS = ("pool", "seed", "eval")


class ManifestError(ValueError):
    """A manifest that cannot be used: missing, wrong columns, duplicate ids, missing image files."""


@dataclass
class BuiltManifest:
    table: pa.Table
    unreadable: pa.Table
    exact_duplicates: int
    files_seen: int

    def counts(self) -> dict[str, int]:
        return {
            "files": self.files_seen,
            "images": self.table.num_rows,
            "unreadable": self.unreadable.num_rows,
            "exact_duplicates": self.exact_duplicates,
        }


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(
    folder: str | Path,
    source: str,
    split: str,
    labels_from_folders: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> BuiltManifest:
    """Scan a folder of images; ids are ``<source>/<path relative to the folder>``."""
    if split not in SPLITS:
        raise ManifestError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not source or "/" in source:
        raise ManifestError(f"source name {source!r} must be non-empty and contain no '/'")
    folder = Path(folder)
    scan = scan_images(folder)
    files, skipped = scan.files, scan.problems
    if not files:
        found = f"; {len(skipped)} unusable entries, first: {skipped.reasons[0]}" if len(skipped) else ""
        raise ManifestError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}{found}")
    entries = len(files) + len(skipped)
    rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
    seen_hashes: set[str] = set()
    duplicates = 0
    for path in tqdm(files, desc=f"manifest {source}", unit="img", disable=len(files) < 1000):
        if try_read_rgb(path, skipped, max_pixels) is None:
            continue
        digest = content_hash(path)
        if digest in seen_hashes:
            duplicates += 1
            continue
        seen_hashes.add(digest)
        relative = path.relative_to(folder).as_posix()
        rows["id"].append(f"{source}/{relative}")
        rows["path"].append(str(path.resolve()))
        rows["content_hash"].append(digest)
        width, height = image_size(path)
        rows["size_bytes"].append(path.stat().st_size)
        rows["width"].append(width)
        rows["height"].append(height)
        rows["source"].append(source)
        rows["split"].append(split)
        rows["label"].append(path.parent.name if labels_from_folders and path.parent != folder else "")
    if not rows["id"]:
        raise ManifestError(f"none of the {len(files)} image files under {folder} could be decoded")
    unreadable = pa.table({"path": skipped.paths, "reason": skipped.reasons}, schema=UNREADABLE_SCHEMA)
    return BuiltManifest(pa.table(rows, schema=MANIFEST_SCHEMA), unreadable, duplicates, entries)


def read_manifest(path: str | Path, check_files: bool = True) -> pa.Table:
    """A manifest, validated: the expected columns, unique ids, and (by default) every file present."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ManifestError(f"{path} is not a Parquet manifest: {error}") from error
    missing_columns = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing_columns:
        raise ManifestError(f"{path} lacks the manifest column(s) {', '.join(missing_columns)}")
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    if table.num_rows == 0:
        raise ManifestError(f"{path} holds no images")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        raise ManifestError(f"{path} has duplicate ids")
    if check_files:
        absent = [p for p in table.column("path").to_pylist() if not os.path.isfile(p)]
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise ManifestError(f"{path}: {len(absent)} image file(s) listed but missing: {shown}")
    return table


def open_image(path: str) -> Image.Image | None:
    """An image for a report grid; None when it can no longer be read."""
    return try_read_rgb(path, SkippedImages(), DEFAULT_MAX_PIXELS)


def prepare(images: Path, source: str, split: str, out: Path, params: PrepareParams) -> dict:
    built = build_manifest(
        images, source, split, labels_from_folders=params.labels_from_folders, max_pixels=params.max_pixels
    )
    with output_folder(out, ("plots",)) as folder:
        write_table(built.table, folder / "manifest.parquet")
        write_table(built.unreadable, folder / "unreadable.parquet")
        metrics = {f"prepare/{key}": value for key, value in built.counts().items()}
        write_json(metrics, folder / "metrics.json")
    return metrics
