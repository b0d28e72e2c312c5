"""The embed stage: a manifest's images through the configured embedder (``embed.model``) into embedding shards.

An evaluation manifest (split ``eval``) is also embedded as its extra views (``embed.eval_views``), so relative
dedup matches cropped copies of evaluation images. The shards are written and resumed by ``embeddings.py``;
the embedders are in ``embedders.py``.
"""

from pathlib import Path

from dinov2.atomic import write_json
from dinov2.configuration.curation import EmbedParams
from dinov2.curation.embedders import build_embedder
from dinov2.curation.embeddings import embed_manifest
from dinov2.curation.manifest import read_manifest


def embed(manifest: Path, out: Path, params: EmbedParams) -> dict:
    splits = set(read_manifest(manifest).column("split").to_pylist())
    views = params.eval_views if splits == {"eval"} else []
    embedder = build_embedder(params.model, params.weights, params.crop_size, params.device)
    if params.calibrated_thresholds is not None:
        embedder.thresholds = dict(params.calibrated_thresholds)
        embedder.thresholds_calibrated_for = embedder.name
    summary = embed_manifest(
        manifest,
        out,
        embedder,
        params.batch_size,
        params.shard_size,
        views,
        num_workers=params.num_workers,
        max_pixels=params.max_pixels,
    )
    metrics = {f"embed/{key}": value for key, value in summary.items()}
    if "embed/embedded" in metrics:
        write_json(metrics, Path(out) / "metrics.json")
    return metrics
