"""On-disk key -> value caches for teacher outputs: append-only Arrow shards, each written atomically and read
memory-mapped.

A folder holds `part-<time>-<pid>-<n>.arrow` files (Arrow IPC) with a string `key` column, its 16-byte
`digest` (blake2b of the key) and a value column. Every `put_many` writes one new shard to a hidden temp name
and renames it into place, so a killed process leaves only whole shards behind (a rerun trusts every `part-*`
file it finds and nothing else). Opening a cache memory-maps its shards: values stay in the page cache, not in
the process's heap; what lives in memory is one sorted array of digests (16 bytes per entry) and the row each
points to, searched with `np.searchsorted`: no Python object per entry. Shards of older prod-st versions
(`part-*.parquet`) are still read (into memory). Only rank 0 writes: under torchrun the ranks add the values
they share with `put_shared`, and the other ranks map the shard rank 0 wrote, so every rank holds mapped
shards, not a heap copy of every value (on MS MARCO's stage 1 that copy was ~6 GB per rank).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from prod_st.util import locks
from prod_st.util.distributed import all_gather, barrier, is_distributed, is_main
from prod_st.util.paths import atomic_path, discard_damaged
from prod_st.util.progress import enabled

logger = logging.getLogger(__name__)

V = TypeVar("V")
_counter = itertools.count()
SHARD_PATTERNS = ("part-*.arrow", "part-*.parquet")  # what a cache folder's shards are named (parquet: older)


def digests(keys: Sequence[str]) -> np.ndarray:
    """16-byte blake2b digests of `keys`, as a numpy 'S16' array (sortable and searchable)."""
    out = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(out, dtype="S16")


def _digest_column(table: pa.Table) -> np.ndarray:
    """The table's digests as an 'S16' array: a zero-copy view of its `digest` column (computed from the keys for
    an older shard without one)."""
    if "digest" not in table.column_names:
        return digests(table.column("key").to_pylist())
    column = table.column("digest").combine_chunks()  # one chunk per shard written here: no copy
    return np.frombuffer(column.buffers()[1], dtype="S16", count=len(column), offset=column.offset * 16)


def _read_shard(path: Path) -> pa.Table | None:
    """A shard memory-mapped (Arrow) or read (older parquet); None when it was removed meanwhile, or is damaged
    (not an Arrow file, truncated, columns that do not fit: then it is removed, and its values are computed
    again when asked for)."""
    try:
        if path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            source = pa.memory_map(str(path))
            try:
                table = ipc.open_file(source).read_all()  # buffers point into the mapping, which outlives the file
            finally:
                source.close()
        table.validate()  # lengths and buffer sizes agree (cheap: no pass over the values)
        if "key" not in table.column_names:
            raise ValueError("no key column")
        return table
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError, ValueError) as e:
        discard_damaged(path, e)
        return None


class _ShardedCache(Generic[V]):
    """Shared plumbing of ScoreCache and EmbeddingCache: shard listing, memory-mapped reads, the digest index,
    atomic appends."""

    value_column = "value"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._chunks: list[pa.Array] = []  # the value column, one chunk per shard (or in-memory put)
        self._sorted = np.empty(0, dtype="S16")  # digests, sorted
        self._rows = np.empty(0, dtype=np.int64)  # global row of each sorted digest
        self._pending: list[np.ndarray] = []  # digests added since the last lookup, in row order
        self._size = 0  # rows so far
        self._shards: set[str] = set()  # names of the shards added (each is added once)
        self._warned = False  # (a rank that cannot see rank 0's shards says so once)
        shards = sorted(p for pattern in SHARD_PATTERNS for p in self.folder.glob(pattern))
        for shard in shards:
            self._add_shard(shard.name)

    # -- per-value-type hooks -------------------------------------------------------------------
    def _value_array(self, values: Sequence[V]) -> pa.Array:
        raise NotImplementedError

    # -- the index ------------------------------------------------------------------------------
    def _add(self, table: pa.Table) -> None:
        self._chunks.extend(table.column(self.value_column).chunks)
        self._pending.append(_digest_column(table))
        self._size += table.num_rows

    def _add_shard(self, name: str) -> bool:
        """Add the shard `name` of the folder, memory-mapped, unless it was added already; False when it is not
        there (removed meanwhile, or written on another machine's disk)."""
        if name in self._shards:
            return True
        if (table := _read_shard(self.folder / name)) is None:
            return False
        self._shards.add(name)
        if table.num_rows:
            self._add(table)
        return True

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """Fold the digests added since the last lookup into the sorted index (a sort of the new ones and
        one merge: linear in the cache's size)."""
        if self._pending:
            new = np.concatenate(self._pending)
            rows = np.arange(self._size - len(new), self._size, dtype=np.int64)
            order = np.argsort(new, kind="stable")
            new, rows = new[order], rows[order]
            where = np.searchsorted(self._sorted, new, side="right")  # after equal digests: first put wins
            self._sorted = np.insert(self._sorted, where, new)
            self._rows = np.insert(self._rows, where, rows)
            self._pending = []
        return self._sorted, self._rows

    def _find(self, keys: Sequence[str]) -> np.ndarray:
        """The row of each key, -1 where it is not cached."""
        found = np.full(len(keys), -1, dtype=np.int64)
        if not len(keys) or not self._size:
            return found
        index, rows = self._index()
        wanted = digests(keys)
        at = np.minimum(np.searchsorted(index, wanted), len(index) - 1)
        hit = index[at] == wanted
        found[hit] = rows[at[hit]]
        return found

    def _take(self, rows: np.ndarray) -> pa.Array:
        """The values at `rows`, copied out of the shards that hold them, shard by shard (a ChunkedArray's own
        `take` would first concatenate every shard into memory)."""
        starts = np.cumsum([0] + [len(c) for c in self._chunks])
        chunk = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        pieces = [self._chunks[chunk[group[0]]].take(pa.array(rows[group] - starts[chunk[group[0]]]))
                  for group in np.split(order, bounds)]
        gathered = pa.concat_arrays(pieces)  # in shard order: put back in the order asked
        return gathered.take(pa.array(np.argsort(order, kind="stable")))

    # -- public API ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of distinct cached keys."""
        index, _ = self._index()
        return int(np.count_nonzero(index[1:] != index[:-1])) + 1 if len(index) else 0

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._find([key])[0] >= 0)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The distinct keys not in the cache, in first-seen order."""
        distinct = list(dict.fromkeys(keys))
        rows = self._find(distinct)
        return [k for k, row in zip(distinct, rows) if row < 0]

    def _table(self, keys: Sequence[str], values: Sequence[V]) -> pa.Table:
        """`keys` -> `values` as a shard's table (key, digest, value column)."""
        keys = list(keys)
        digest = digests(keys)
        return pa.table({
            "key": pa.array(keys, pa.string()),
            "digest": pa.Array.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(digest.tobytes())]),
            self.value_column: self._value_array(values),
        })

    def _write(self, table: pa.Table) -> str:
        """Write `table` as a new shard (temp file + rename: a killed process leaves no half shard); its name."""
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{next(_counter):06d}.arrow"
        with atomic_path(self.folder / name) as tmp, ipc.new_file(str(tmp), table.schema) as writer:
            writer.write_table(table)
        return name

    def put_many(self, keys: Sequence[str], values: Sequence[V]) -> None:
        """Add `keys` -> `values`; on rank 0 as one new shard (temp file + rename), read back memory-mapped; on
        another rank in memory (when every rank adds the same values, `put_shared` keeps them mapped there too)."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if not len(keys):
            return
        table = self._table(keys, values)
        if is_main() and self._add_shard(self._write(table)):
            return  # mapped: the values leave the heap
        self._add(table)

    def put_shared(self, keys: Sequence[str], values: Sequence[V]) -> None:
        """`put_many` of the same `keys` -> `values` on every rank (a collective: every rank calls it). Rank 0
        writes the shard; the others learn its name once the file is in place (the all_gather orders the read
        after the rename) and map it, so no rank keeps the values in its own memory. A rank that cannot see
        the file (a cache folder not shared between machines) keeps them in memory, as `put_many` does, and
        logs it once."""
        if not is_distributed():
            return self.put_many(keys, values)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        name = all_gather(self._write(self._table(keys, values)) if is_main() and len(keys) else None)[0]
        if name is None or self._add_shard(name):
            return
        if not self._warned:
            self._warned = True
            logger.warning("%s: rank 0's shard %s is not visible here: this rank keeps the cache's new values in "
                           "memory (put the cache on a file system every rank shares)", self.folder, name)
        self._add(self._table(keys, values))


class ScoreCache(_ShardedCache[float]):
    """key -> float32 score (e.g. a cross-encoder logit of one (query, document) pair)."""

    value_column = "score"

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        """{key: value} for the keys present (missing keys are simply absent); Python floats of the float32
        values."""
        keys = list(keys)
        rows = self._find(keys)
        hit = rows >= 0
        if not hit.any():
            return {}
        values = self._take(rows[hit]).to_numpy(zero_copy_only=False).astype(np.float32, copy=False).tolist()
        return dict(zip((k for k, h in zip(keys, hit) if h), values))

    def _value_array(self, values: Sequence[float]) -> pa.Array:
        return pa.array(np.asarray(values, dtype=np.float32), pa.float32())


class EmbeddingCache(_ShardedCache[np.ndarray]):
    """key -> float32 vector (a text's embedding), stored as a fixed-size-list column. A process that opens one
    holds it (`locks.use`): `release_embedding_cache` by another run leaves it alone."""

    value_column = "vector"

    def __init__(self, folder: str | Path) -> None:
        locks.use(Path(folder))
        super().__init__(folder)

    def _value_array(self, values: Sequence[np.ndarray]) -> pa.Array:
        matrix = np.asarray(values, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"embeddings must be (n, dim), got shape {matrix.shape}")
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), matrix.shape[1])

    def matrix(self, keys: Sequence[str]) -> np.ndarray:
        """(len(keys), dim) float32 rows of `keys`, all of which must be cached."""
        rows = self._find(list(keys))
        if (rows < 0).any():
            raise KeyError(list(keys)[int(np.argmax(rows < 0))])
        if not len(rows):
            return np.zeros((0, 0), dtype=np.float32)
        column = self._take(rows)
        flat = column.flatten().to_numpy(zero_copy_only=False, writable=True).astype(np.float32, copy=False)
        return flat.reshape(len(rows), column.type.list_size)


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


def release_embedding_cache(folder: Path) -> bool:
    """Delete a bi-encoder's cache folder's embeddings (a collective: every rank calls it) unless another run is
    reading them: the shards and half-written temp shards (only the files this module writes), then
    `embeddings/` and the folder if nothing else is left in them. Returns whether they were deleted."""
    shards = folder / "embeddings"
    if not is_main():
        locks.drop(shards)
    barrier()  # every rank of this run has let go
    removed = is_main() and locks.remove_unless_used(shards, _remove_shards)
    barrier()
    return removed


def _remove_shards(shards: Path) -> None:
    patterns = (*SHARD_PATTERNS, ".part-*.tmp*", locks.IN_USE)
    for path in [p for pattern in patterns for p in shards.glob(pattern)]:
        path.unlink(missing_ok=True)
    for empty in (shards, shards.parent):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
