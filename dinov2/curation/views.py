"""Deterministic extra views of evaluation images: the query-side augmentation of copy detection.

A pool image that is a cropped copy of an evaluation image shows only part of it; a descriptor of the
whole evaluation image can then miss it at a threshold strict enough to keep unrelated images apart.
Embedding each EVALUATION image a few more times, as the crops a copier typically makes, and removing
pool images near any of these views raises the recall of relative dedup without lowering its threshold.
Only evaluation-side points are added, so the k-NN graph gains no links between pool images and
chaining through the pool does not grow (measured in dinov2/curation/README.md).

A view is named by a string:

- ``centre_crop:F``: the centred crop keeping the fraction F (0 < F < 1) of each side;
- ``corner_crops:F``: the four corner crops keeping F of each side (four views);
- ``mirror``: the left-right mirror (useless for the mirror-invariant copy descriptor, useful for backbones).
"""

from dataclasses import dataclass

from PIL import Image, ImageOps

VIEW_KINDS = ("centre_crop", "corner_crops", "mirror")


@dataclass(frozen=True)
class View:
    kind: str
    fraction: float = 1.0

    @property
    def count(self) -> int:
        return 4 if self.kind == "corner_crops" else 1

    def apply(self, image: Image.Image) -> list[Image.Image]:
        if self.kind == "mirror":
            return [ImageOps.mirror(image)]
        width, height = image.size
        crop_w, crop_h = max(1, round(width * self.fraction)), max(1, round(height * self.fraction))
        if self.kind == "centre_crop":
            corners = [((width - crop_w) // 2, (height - crop_h) // 2)]
        else:
            corners = [(0, 0), (width - crop_w, 0), (0, height - crop_h), (width - crop_w, height - crop_h)]
        return [image.crop((left, top, left + crop_w, top + crop_h)) for left, top in corners]


def parse_view(spec: str) -> View:
    kind, _, fraction = spec.partition(":")
    if kind not in VIEW_KINDS:
        raise ValueError(f"unknown view {spec!r}; expected centre_crop:F, corner_crops:F or mirror")
    if kind == "mirror":
        if fraction:
            raise ValueError(f"view {spec!r}: mirror takes no fraction")
        return View("mirror")
    try:
        value = float(fraction)
    except ValueError:
        raise ValueError(f"view {spec!r}: expected {kind}:F with a fraction F, e.g. {kind}:0.8") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"view {spec!r}: the kept fraction must lie strictly between 0 and 1")
    return View(kind, value)


def parse_views(specs: list[str]) -> list[View]:
    views = [parse_view(spec) for spec in specs]
    if len(set(views)) != len(views):
        raise ValueError(f"views {specs} name the same view twice")
    return views


def views_per_image(views: list[View]) -> int:
    return sum(view.count for view in views)


def expand(image: Image.Image, views: list[View]) -> list[Image.Image]:
    """Every view of one image, in the order of ``views`` (corner crops: top-left, top-right, bottom-left, -right)."""
    return [crop for view in views for crop in view.apply(image)]
