"""What a person looks at after a curation stage: counts (DVC metrics), PNG grids and cluster shares (DVC plots)."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinov2.curation.manifest import open_image

CELL = 72


def image_grid(rows: Sequence[Sequence[str]], cell: int = CELL) -> Image.Image:
    """One row of thumbnails per group; the first image of a row gets a red frame (the kept / seed image)."""
    width = max((len(row) for row in rows), default=1)
    grid = Image.new("RGB", (max(1, width) * cell, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        for x, path in enumerate(row):
            image = open_image(path)
            if image is not None:
                grid.paste(image.resize((cell - 4, cell - 4), Image.BILINEAR), (x * cell + 2, y * cell + 2))
            if x == 0:
                draw.rectangle([x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1], outline="red", width=2)
    return grid


def cluster_share_plot(counts: Mapping[str, np.ndarray], path: Path) -> None:
    """Images per cluster, clusters ordered by pool size, one line per series (pool, curated...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.5))
    order = np.argsort(-next(iter(counts.values())), kind="stable")
    for name, values in counts.items():
        axes.plot(np.asarray(values)[order], label=name)
    axes.set_xlabel("cluster (by pool size)")
    axes.set_ylabel("images")
    axes.set_yscale("symlog")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
