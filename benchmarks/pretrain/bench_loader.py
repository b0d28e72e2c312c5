"""Start-up time and memory of the pretraining data layer over a synthetic manifest of N images.

Writes a Parquet manifest of N rows (``id``, ``path`` like ``shard_00042/0000420000.jpg``, ``label``),
opens it as the engine does (``ManifestDataset``: the Arrow index is built on the first open and
memory-mapped), builds the resumable sampler and the pretraining loader with W worker processes, and
takes a few steps. Each sample is the manifest row of its image (path and label, looked up per index
in the worker) instead of the decoded image: the files do not exist, and decoding costs the same
whatever N is. Prints one JSON line per N: index build time, open time once the index exists, time
to the first batch, and memory (MiB) of the main process and of each worker. RSS overstates it: it
counts the pages a forked worker shares with its parent and every page of the memory-mapped index
the kernel maps around a lookup (page cache, shared by all processes, reclaimable). What a process
holds on its own is its anonymous memory: ``anonymous`` growth for the main process, ``own`` (private
anonymous pages) for a worker.

    python benchmarks/pretrain/bench_loader.py --rows 1000000 --rows 100000000 --workers 2
"""

import argparse
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dinov2.data.datasets import ManifestDataset
from dinov2.data.loaders import make_pretraining_loader
from dinov2.data.samplers import ResumableInfiniteSampler

ROWS_PER_GROUP = 1_000_000


def write_synthetic_manifest(path: Path, rows: int) -> None:
    """``rows`` images in shards of 10,000, written a million rows at a time (bounded memory)."""
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROWS_PER_GROUP):
            ids = pa.array(range(start, min(start + ROWS_PER_GROUP, rows)), pa.int64())
            shard = pc.utf8_lpad(pc.cast(pc.divide(ids, 10_000), pa.string()), 5, "0")
            name = pc.utf8_lpad(pc.cast(ids, pa.string()), 10, "0")
            paths = pc.binary_join_element_wise("shard_", shard, "/", name, ".jpg", "")
            writer.write_table(pa.table([ids, paths, pc.divide(ids, 1000)], schema=schema))


def memory_mib() -> dict[str, float]:
    """This process's resident memory (Linux ``/proc/self/smaps``), MiB. ``own`` sums the private
    dirty pages of anonymous mappings only: pages of a freshly written file are dirty too, but they
    are page cache."""
    totals = {"rss": 0.0, "anonymous": 0.0, "own": 0.0}
    anonymous_mapping = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        words = line.split(maxsplit=5)
        if not words[0].endswith(":"):  # a mapping's header (address range ... path), then its "Name: value" lines
            anonymous_mapping = len(words) < 6 or words[5].startswith("[")
            continue
        name, value = words[0].removesuffix(":"), words[1] if len(words) > 1 else "0"
        if name in ("Rss", "Anonymous"):
            totals[name.lower()] += int(value) / 1024
        elif name == "Private_Dirty" and anonymous_mapping:
            totals["own"] += int(value) / 1024
    return totals


class ManifestRows(ManifestDataset):
    """The manifest row of each image instead of the image."""

    def load(self, index: int, generator: torch.Generator | None = None):
        return {"path_length": len(str(self.path_at(index)))}, self.label_at(index)


def collate_rows(samples: list) -> dict:
    return {"images": len(samples), "worker_memory_mib": memory_mib()}


def measure(manifest: Path, index_dir: Path, workers: int, batch_size: int, steps: int) -> dict:
    """Run in a fresh process, so its memory figures are the data layer's alone. Its workers are
    forked, as the engine's are on Linux (a spawned process would spawn them)."""
    multiprocessing.set_start_method("fork", force=True)
    before_index = memory_mib()
    tick = time.perf_counter()
    ManifestRows(manifest, index_dir=index_dir)  # builds the index unless an earlier run left it
    first_open = time.perf_counter() - tick
    before = memory_mib()
    tick = time.perf_counter()
    dataset = ManifestRows(manifest, index_dir=index_dir)
    sampler = ResumableInfiniteSampler(len(dataset), batch_size, seed=0)
    loader = make_pretraining_loader(dataset, sampler, batch_size, collate_rows, num_workers=workers)
    open_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_batch_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    last = list(islice(batches, steps))
    steps_per_second = len(last) / (time.perf_counter() - tick)
    after = memory_mib()
    # the last `workers` batches come one from each worker
    worker_memory = [batch["worker_memory_mib"] for batch in last[-workers:]] if workers else []
    return {
        "rows": len(dataset),
        "workers": workers,
        "batch_size": batch_size,
        "index_gib": round(dataset.index_path.stat().st_size / 2**30, 3),
        "first_open_seconds": round(first_open, 2),
        "open_seconds": round(open_seconds, 3),
        "first_batch_seconds": round(first_batch_seconds, 2),
        "steps_per_second": round(steps_per_second, 1),
        "images": first["images"],
        "index_build_anonymous_growth_mib": round(before["anonymous"] - before_index["anonymous"], 1),
        "main_anonymous_growth_mib": round(after["anonymous"] - before["anonymous"], 1),
        "main_rss_growth_mib": round(after["rss"] - before["rss"], 1),
        "worker_own_mib": [round(m["own"], 1) for m in worker_memory],
        "worker_rss_mib": [round(m["rss"], 1) for m in worker_memory],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="manifest size (repeatable) [default: 10^6]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="steps timed after the first batch")
    parser.add_argument("--folder", type=Path, help="where manifests and indexes are kept [default: a temp dir]")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = arguments.folder or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for rows in arguments.rows or [1_000_000]:
            manifest = folder / f"synthetic_{rows}.parquet"
            if not manifest.is_file():
                write_synthetic_manifest(manifest, rows)
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=spawn) as fresh:
                task = fresh.submit(
                    measure, manifest, folder / "index", arguments.workers, arguments.batch_size, arguments.steps
                )
                print(json.dumps(task.result()), flush=True)


if __name__ == "__main__":
    main()
