"""Relative dedup with and without extra views of the evaluation images, on planted copies of CIFAR-10.

    .venv/bin/python benchmarks/curation/measure_eval_views.py --cifar-root /path/to/cifar10

Eval set: 300 CIFAR-10 test images. Pool: 2,700 other test images, the four planted copies of each eval
image the tests use (JPEG q40, 48 px, 90% centre crop, mirror), plus ONE set of extra crops of every eval
image at a time (centre crops at other fractions, off-centre crops), so that crops of one image cannot
bridge each other. For each set of views it prints, at the copy descriptor's relative threshold, how
many copies escape and how many of the 2,700 unrelated images are removed.
"""

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dinov2.copydetect.copy_descriptor import COPY_DESCRIPTOR_DIM, COPY_DESCRIPTOR_THRESHOLDS, copy_descriptor
from dinov2.copydetect.edits import WEB_COPIES, apply_edits, centred, web_copy
from dinov2.curation.dedup import relative_dedup
from dinov2.curation.views import expand, parse_views


def cropped(image: Image.Image, kept: float) -> Image.Image:
    return apply_edits(image, [centred("trim", image.size, kept)])


VIEW_SETS = [
    [],
    ["centre_crop:0.9"],
    ["centre_crop:0.9", "centre_crop:0.8"],
    ["centre_crop:0.85", "centre_crop:0.7"],
    ["centre_crop:0.9", "centre_crop:0.8", "corner_crops:0.8"],
    ["centre_crop:0.9", "centre_crop:0.8", "corner_crops:0.9"],
]


def corner(image: Image.Image, keep: float, right: bool, bottom: bool) -> Image.Image:
    width, height = image.size
    crop_w, crop_h = int(width * keep), int(height * keep)
    left, top = (width - crop_w) * right, (height - crop_h) * bottom
    return image.crop((left, top, left + crop_w, top + crop_h))


EXTRA_CROPS: dict[str, Callable[[Image.Image], Image.Image]] = {
    **{f"centre {f}": (lambda image, f=f: cropped(image, f)) for f in (0.95, 0.85, 0.8, 0.75, 0.7)},
    "mirrored centre 0.8": lambda image: ImageOps.mirror(cropped(image, 0.8)),
    "top-left 0.85": lambda image: corner(image, 0.85, False, False),
    "bottom-right 0.75": lambda image: corner(image, 0.75, True, True),
}


def describe(images: list[Image.Image]) -> np.ndarray:
    if not images:
        return np.zeros((0, COPY_DESCRIPTOR_DIM), dtype=np.float32)
    return np.stack([copy_descriptor(image) for image in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-root", type=Path, required=True, help="folder holding test/<class>/*.jpg")
    args = parser.parse_args()
    files = sorted((args.cifar_root / "test").rglob("*.jpg"))
    if len(files) < 3000:
        raise SystemExit(f"{args.cifar_root}/test holds {len(files)} JPEG images, expected CIFAR-10's 10,000")
    random.Random(0).shuffle(files)
    originals = [Image.open(path).convert("RGB") for path in files[:3000]]
    evaluation = describe(originals[:300])
    copies = describe([web_copy(image, name) for image in originals[:300] for name in WEB_COPIES])
    pool = np.concatenate([describe(originals[300:]), copies])
    extra = {name: describe([edit(image) for image in originals[:300]]) for name, edit in EXTRA_CROPS.items()}
    threshold = COPY_DESCRIPTOR_THRESHOLDS["relative"]
    print(f"relative threshold {threshold}; copies escaping (of 300) per planted edit {list(WEB_COPIES)}")
    for names in VIEW_SETS:
        views = parse_views(names)
        views_of_eval = describe([view for image in originals[:300] for view in expand(image, views)])
        queries = np.concatenate([evaluation, views_of_eval])
        clean = relative_dedup(pool, [queries], k=64, threshold=threshold)
        line = [
            f"views {names or 'none'}: eval vectors {len(queries)}",
            f"planted {clean[2700:].reshape(300, 4).sum(0).tolist()}",
            f"unrelated removed {(~clean[:2700]).sum()} of 2700 ({(~clean[:2700]).mean():.1%})",
        ]
        for name, crops in extra.items():
            result = relative_dedup(np.concatenate([pool, crops]), [queries], k=64, threshold=threshold)
            line.append(f"{name}: {result[3900:].sum()}")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
