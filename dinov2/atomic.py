"""Outputs that are complete or absent: written under a hidden ``.<name>.partial`` name beside the target
and renamed into place in one step, so a crash, a kill or an error never leaves a file or a folder that
looks finished (a rename within one file system is atomic)."""

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(partial)`` writes the content; the partial file then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_json(data: Mapping[str, Any], path: str | Path, sort_keys: bool = True) -> Path:
    text = json.dumps(data, indent=2, sort_keys=sort_keys) + "\n"
    return write_atomically(path, lambda partial: partial.write_text(text))


def write_table(table, path: str | Path) -> Path:
    """A pyarrow table as a Parquet file."""
    import pyarrow.parquet as pq

    return write_atomically(path, lambda partial: pq.write_table(table, partial))


@contextmanager
def output_folder(out: str | Path, subfolders: tuple[str, ...] = ()) -> Iterator[Path]:
    """A fresh partial folder (with ``subfolders``) that replaces ``out`` only if the block completes."""
    out = Path(out)
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in subfolders:
        (partial / name).mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
