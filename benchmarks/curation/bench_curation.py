"""Curation throughput: embeddings/s of a backbone, and k-NN graph + self-dedup time for N vectors.

    .venv/bin/python benchmarks/curation/bench_curation.py --sizes 100000 1000000 --dim 256 \
        --model copy_descriptor --images 512

The vectors are random unit vectors plus planted near-copies (1% of N), so the dedup has work to do;
the index is the one ``plan_index`` chooses (exact up to 200k vectors, IVF-PQ beyond). Runs on a GPU
when there is one (faiss-gpu, or the torch matmul fallback for the exact index).
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

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


def planted_pool(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    copies = n // 100
    vectors[-copies:] = vectors[:copies] + 0.1 * rng.standard_normal((copies, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--model", default="copy_descriptor")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; faiss GPUs: {faiss_gpus()}")
    rate = embeddings_per_second(args.model, args.images, args.crop_size, args.batch_size)
    print(f"embed {args.model}: {rate:.1f} images/s")
    for n in args.sizes:
        vectors = planted_pool(n, args.dim)
        start = time.perf_counter()
        result = self_dedup(vectors, k=args.k, threshold=0.6)
        seconds = time.perf_counter() - start
        print(
            f"N={n:,} d={args.dim} k={args.k} index={plan_index(n, args.dim).kind}: k-NN + dedup {seconds:.1f} s, "
            f"removed {result.counts()['removed']:,} (planted {n // 100:,})"
        )


if __name__ == "__main__":
    main()
