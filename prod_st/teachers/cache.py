"""On-disk key -> value caches for teacher outputs: append-only parquet shards, each written atomically.

A folder holds `part-<time>-<pid>-<n>.parquet` files with a string `key` column and a value column. Every
`put_many` writes one new shard to a hidden temp name and renames it into place, so a killed process
leaves only whole shards behind (a rerun trusts every `part-*.parquet` it finds and nothing else). Shards
are read once, when the cache is opened. Only rank 0 writes; other ranks keep their values in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prod_st.distributed import is_main
from prod_st.progress import enabled

logger = logging.getLogger(__name__)

V = TypeVar("V")
_counter = itertools.count()


class _ShardedCache(Generic[V]):
    """Shared plumbing of ScoreCache and EmbeddingCache: shard listing, loading, atomic appends."""

    value_column = "value"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._values: dict[str, V] = {}
        for shard in sorted(self.folder.glob("part-*.parquet")):
            try:
                table = pq.read_table(shard)
            except FileNotFoundError:  # removed between listing and reading: nothing to trust there
                continue
            self._load(table)

    # -- per-value-type hooks -------------------------------------------------------------------
    def _load(self, table: pa.Table) -> None:
        raise NotImplementedError

    def _value_array(self, values: Sequence[V]) -> pa.Array:
        raise NotImplementedError

    def _store(self, keys: Sequence[str], values: Sequence[V]) -> None:
        self._values.update(zip(keys, values))

    # -- public API ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        """{key: value} for the keys present (missing keys are simply absent)."""
        values = self._values
        return {k: values[k] for k in keys if k in values}

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The distinct keys not in the cache, in first-seen order."""
        values = self._values
        return [k for k in dict.fromkeys(keys) if k not in values]

    def put_many(self, keys: Sequence[str], values: Sequence[V]) -> None:
        """Add `keys` -> `values`; on rank 0 also write them as one new shard (temp file + rename)."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if not len(keys):
            return
        self._store(list(keys), values)
        if not is_main():
            return
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{next(_counter):06d}.parquet"
        table = pa.table({"key": pa.array(list(keys), pa.string()), self.value_column: self._value_array(values)})
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)


class ScoreCache(_ShardedCache[float]):
    """key -> float32 score (e.g. a cross-encoder logit of one (query, document) pair)."""

    value_column = "score"

    def _store(self, keys: Sequence[str], values: Sequence[float]) -> None:
        # Python floats of the float32 values: identical whether they come from a model or from a shard.
        super()._store(keys, np.asarray(values, dtype=np.float32).tolist())

    def _load(self, table: pa.Table) -> None:
        self._store(table.column("key").to_pylist(), table.column(self.value_column).to_pylist())

    def _value_array(self, values: Sequence[float]) -> pa.Array:
        return pa.array(np.asarray(values, dtype=np.float32), pa.float32())


class EmbeddingCache(_ShardedCache[np.ndarray]):
    """key -> float32 vector (a text's embedding), stored as a fixed-size-list column."""

    value_column = "vector"

    def _load(self, table: pa.Table) -> None:
        column = table.column(self.value_column).combine_chunks()
        dim = column.type.list_size
        matrix = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        self._store(table.column("key").to_pylist(), list(matrix))

    def _value_array(self, values: Sequence[np.ndarray]) -> pa.Array:
        matrix = np.asarray(values, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"embeddings must be (n, dim), got shape {matrix.shape}")
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])

    def matrix(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), dim) float32 rows of `keys`, all of which must be cached."""
        values = self._values
        return np.stack([values[k] for k in keys]).astype(np.float32, copy=False)


def fill_missing(
    cache: _ShardedCache[V],
    items: dict[str, Any],
    compute: Callable[[list[Any]], Sequence[V]],
    *,
    chunk_size: int,
    length: Callable[[Any], int],
    progress: bool = True,
    desc: str = "teacher",
) -> int:
    """Compute and cache the values of `items` ({key: input}) whose key is not cached yet.

    The missing inputs are sorted longest first (so each model batch pads little) and computed
    `chunk_size` at a time with `compute(inputs) -> values`; each chunk is written as its own shard before
    the next starts, so an interruption keeps every finished chunk. Returns the number of inputs computed.
    """
    todo = cache.missing(items)
    if not todo:
        return 0
    todo.sort(key=lambda k: length(items[k]), reverse=True)
    bar = tqdm(total=len(todo), desc=desc, unit="item", disable=not enabled(progress))
    try:
        for start in range(0, len(todo), chunk_size):
            keys = todo[start : start + chunk_size]
            cache.put_many(keys, compute([items[k] for k in keys]))
            bar.update(len(keys))
    finally:
        bar.close()
    logger.info("%s: computed %d new values into %s", desc, len(todo), cache.folder)
    return len(todo)
