"""Curation throughput: embeddings/s of a backbone, and k-NN graph + self-dedup time for N vectors.

    .venv/bin/python benchmarks/curation/bench_curation.py --sizes 100000 1000000 --dim 256 \
        --model copy_descriptor --images 512

The vectors are random unit vectors plus planted near-copies (1% of N): original + noise of relative norm
``--copy-noise`` (0.1: cosine about 0.995; 0.88: cosine about 0.75, near the 0.6 threshold), so the dedup
has work to do; the index is the one ``plan_index`` chooses (exact up to 200k
vectors, IVF-PQ beyond). Besides the time, each size reports the recall of the planted copies (a copy
counts as found when it shares a component with its original) and how many unrelated vectors were
removed, so a faster index cannot hide missed duplicates. Runs on a GPU when there is one (faiss-gpu, or
the torch matmul fallback for the exact index). ``--images 0`` skips the embedding throughput.
"""

import argparse
import logging
import time

import numpy as np
import torch
from PIL import Image

from dinov2.configuration.curation import IndexParams
from dinov2.curation.dedup import self_dedup
from dinov2.curation.embedders import build_embedder
from dinov2.curation.index import faiss_gpus, plan_index


def embeddings_per_second(model: str, images: int, crop_size: int, batch_size: int) -> float:
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut())
    embedder = build_embedder(model, crop_size=crop_size)
    batch = [photo.rotate(i % 360) for i in range(batch_size)]
    embedder.embed(batch[:2])
    start = time.perf_counter()
    for _ in range(max(1, images // batch_size)):
        embedder.embed(batch)
    return max(1, images // batch_size) * batch_size / (time.perf_counter() - start)


def planted_pool(n: int, dim: int, copy_noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Random unit vectors whose last n // 100 rows are near-copies of the first n // 100."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    copies = n // 100
    vectors[-copies:] = vectors[:copies] + copy_noise * rng.standard_normal((copies, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--model", default="copy_descriptor")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=None, help="IVF cells probed per query (index.py's default)")
    parser.add_argument("--copy-noise", type=float, default=0.1, help="noise norm of a copy, relative to its original")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; faiss GPUs: {faiss_gpus()}", flush=True)
    if args.images:
        rate = embeddings_per_second(args.model, args.images, args.crop_size, args.batch_size)
        print(f"embed {args.model}: {rate:.1f} images/s", flush=True)
    for n in args.sizes:
        vectors = planted_pool(n, args.dim, args.copy_noise)
        copies = n // 100
        cosines = np.einsum("ij,ij->i", vectors[:copies], vectors[n - copies :])
        start = time.perf_counter()
        index = IndexParams() if args.nprobe is None else IndexParams(nprobe=args.nprobe)
        result = self_dedup(vectors, k=args.k, threshold=0.6, index=index)
        seconds = time.perf_counter() - start
        found = result.labels[n - copies :] == result.labels[:copies]
        unrelated_removed = int((~result.keep[copies : n - copies]).sum())
        plan = plan_index(n, args.dim, index)
        print(
            f"N={n:,} d={args.dim} k={args.k} index={plan}: k-NN + dedup {seconds:.1f} s, "
            f"copy cosines {cosines.min():.3f}..{cosines.max():.3f}, "
            f"removed {result.counts()['removed']:,}; planted copies found {int(found.sum()):,} of {copies:,} "
            f"(recall {found.mean():.4f}); unrelated vectors removed {unrelated_removed:,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
