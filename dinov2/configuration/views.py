"""The extra views of evaluation images named in ``embed.eval_views``: the grammar, checked with the params.

A view is named by a string:

- ``centre_crop:F``: the centred crop keeping the fraction F (0 < F < 1) of each side;
- ``corner_crops:F``: the four corner crops keeping F of each side (four views);
- ``mirror``: the left-right mirror.

``dinov2/curation/views.py`` makes the views of an image.
"""

from dataclasses import dataclass

VIEW_KINDS = ("centre_crop", "corner_crops", "mirror")


@dataclass(frozen=True)
class View:
    kind: str
    fraction: float = 1.0

    @property
    def count(self) -> int:
        return 4 if self.kind == "corner_crops" else 1


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
