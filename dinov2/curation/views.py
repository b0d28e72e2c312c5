"""Deterministic extra views of evaluation images: the query-side augmentation of copy detection.

A pool image that is a cropped copy of an evaluation image shows only part of it; a descriptor of the
whole evaluation image can then miss it at a threshold strict enough to keep unrelated images apart.
Embedding each EVALUATION image a few more times, as the crops a copier typically makes, and removing
pool images near any of these views raises the recall of relative dedup without lowering its threshold.
Only evaluation-side points are added, so the k-NN graph gains no links between pool images and
chaining through the pool does not grow (measured in benchmarks/curation/README.md).

A view is named by a string:

- ``centre_crop:F``: the centred crop keeping the fraction F (0 < F < 1) of each side;
- ``corner_crops:F``: the four corner crops keeping F of each side (four views);
- ``mirror``: the left-right mirror (useless for the mirror-invariant copy descriptor, useful for backbones).
"""

from PIL import Image, ImageOps

from dinov2.configuration.views import View, parse_views

__all__ = ["View", "expand", "parse_views", "view_crops", "views_per_image"]


def view_crops(view: View, image: Image.Image) -> list[Image.Image]:
    """The image(s) of one view of ``image``."""
    if view.kind == "mirror":
        return [ImageOps.mirror(image)]
    width, height = image.size
    crop_w, crop_h = max(1, round(width * view.fraction)), max(1, round(height * view.fraction))
    if view.kind == "centre_crop":
        corners = [((width - crop_w) // 2, (height - crop_h) // 2)]
    else:
        corners = [(0, 0), (width - crop_w, 0), (0, height - crop_h), (width - crop_w, height - crop_h)]
    return [image.crop((left, top, left + crop_w, top + crop_h)) for left, top in corners]


def views_per_image(views: list[View]) -> int:
    return sum(view.count for view in views)


def expand(image: Image.Image, views: list[View]) -> list[Image.Image]:
    """Every view of one image, in the order of ``views`` (corner crops: top-left, top-right, bottom-left, -right)."""
    return [crop for view in views for crop in view_crops(view, image)]
