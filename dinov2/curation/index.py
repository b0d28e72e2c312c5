"""One small wrapper around faiss for inner-product (cosine on unit vectors) nearest-neighbour search.

Settings: ``IndexParams`` (``dedup.index``, ``retrieve.index``).

- ``flat``: exact ``IndexFlatIP``; the default up to ``exact_limit`` vectors.
- ``ivfpq``: ``IndexIVFPQ`` for large pools, PQ with about d/4 sub-quantisers of 8 bits. Dedup searches
  the whole pool against itself, so a query costs nlist * d (coarse assignment) + nprobe * (n / nlist) * m
  (code scan). nlist = 2 sqrt(n) keeps both terms O(sqrt(n)) and the coarse k-means cheap: it is trained
  on a sample of ``training_points_per_list`` points per list (faiss needs 39). The default nprobe is
  measured in ``benchmarks/curation/README.md`` (recall of near-threshold copies against time).
- Placement: faiss GPU indexes (sharded over every GPU) when faiss was built with GPU support and a
  GPU is present; otherwise, for the exact index on a CUDA device, a chunked torch matmul + top-k;
  otherwise faiss on the CPU.
"""

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
import torch

from dinov2.configuration.curation import IndexParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexPlan:
    kind: Literal["flat", "ivfpq"]
    nlist: int = 0
    pq_subquantizers: int = 0
    nprobe: int = 0


def plan_index(n: int, dim: int, settings: IndexParams | None = None, nlist: int | None = None) -> IndexPlan:
    """Index parameters from the pool size (n vectors of dimension dim)."""
    settings = settings or IndexParams()
    if settings.kind == "flat" or (settings.kind == "auto" and n <= settings.exact_limit):
        return IndexPlan("flat")
    # faiss wants at least 39 training points per centroid.
    lists = nlist or max(1, min(int(2 * math.sqrt(n)), n // 39))
    subquantizers = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    return IndexPlan("ivfpq", lists, subquantizers, min(lists, settings.nprobe))


def faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def check_vectors(vectors: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"{name} must be a (n, d) matrix, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"{name} have dimension {vectors.shape[1]}, the index holds {dim}-d vectors")
    if not np.isfinite(vectors).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return np.ascontiguousarray(vectors, dtype=np.float32)


class VectorIndex:
    """Build once over a pool, then ``search(queries, k)`` -> (similarities, pool row numbers)."""

    def __init__(
        self, vectors: np.ndarray, settings: IndexParams | None = None, nlist: int | None = None, seed: int = 0
    ):
        self.vectors = check_vectors(vectors, "pool vectors")
        n, self.dim = self.vectors.shape
        if n == 0:
            raise ValueError("cannot index an empty pool")
        self.settings = settings = settings or IndexParams()
        self.plan = plan_index(n, self.dim, settings, nlist)
        placement = settings.placement
        use_gpu = placement == "gpu" or (placement == "auto" and (faiss_gpus() > 0 or torch.cuda.is_available()))
        if placement == "gpu" and not (faiss_gpus() > 0 or torch.cuda.is_available()):
            raise ValueError("placement 'gpu' asked for, but there is no GPU")
        self.backend = "faiss-cpu"
        self._torch_pool: torch.Tensor | None = None
        if use_gpu and faiss_gpus() == 0:
            if self.plan.kind != "flat":
                logger.warning("faiss has no GPU support here: IVF-PQ runs on the CPU")
            else:
                self._torch_pool = torch.from_numpy(self.vectors).cuda()
                self.backend = "torch-cuda"
                return
        index = self._cpu_index(seed)
        if use_gpu and faiss_gpus() > 0:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = True
            index = faiss.index_cpu_to_all_gpus(index, co=options)
            self.backend = f"faiss-gpu x{faiss_gpus()}"
        self.index = index

    def _cpu_index(self, seed: int) -> faiss.Index:
        if self.plan.kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFPQ(
                quantizer, self.dim, self.plan.nlist, self.plan.pq_subquantizers, 8, faiss.METRIC_INNER_PRODUCT
            )
            index.cp.seed = seed
            size = min(len(self.vectors), self.plan.nlist * self.settings.training_points_per_list)
            sample = np.random.default_rng(seed).choice(len(self.vectors), size=size, replace=False)
            started = time.perf_counter()
            index.train(self.vectors[np.sort(sample)])
            logger.info(
                "trained IVF-PQ (%d lists, %d sub-quantisers) on %d vectors in %.1f s",
                self.plan.nlist,
                self.plan.pq_subquantizers,
                size,
                time.perf_counter() - started,
            )
            index.nprobe = self.plan.nprobe
        index.add(self.vectors)
        return index

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product; rows padded with (-inf, -1) when the pool has fewer than k vectors."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = check_vectors(queries, "query vectors", self.dim)
        found = min(k, len(self))
        sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for start in range(0, len(queries), chunk):
            block = queries[start : start + chunk]
            if self._torch_pool is not None:
                scores = torch.from_numpy(block).cuda() @ self._torch_pool.T
                top = scores.topk(found, dim=1)
                block_sims, block_rows = top.values.cpu().numpy(), top.indices.cpu().numpy()
            else:
                block_sims, block_rows = self.index.search(block, found)
            sims[start : start + len(block), :found] = block_sims
            rows[start : start + len(block), :found] = block_rows
            if len(queries) > chunk:
                logger.info("searched %d of %d queries", start + len(block), len(queries))
        return sims, rows
