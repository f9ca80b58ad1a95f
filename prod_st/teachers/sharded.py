"""Teacher work split across ranks: under torchrun every rank computes an equal share of the uncached items
(pairs to score, texts to embed), and after each round of chunks all ranks merge the shares into the cache
(rank 0 writes the shard, the others map it), so no rank waits while another scores everything."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from prod_st.teachers.cache import fill_missing
from prod_st.util.distributed import all_gather, barrier, rank, world_size

logger = logging.getLogger(__name__)


def fill_missing_shared(
    cache,
    items: dict[str, Any],
    compute: Callable[[list[Any]], Sequence],
    *,
    chunk_size: int,
    length: Callable[[Any], int],
    progress: bool = True,
    desc: str = "teacher",
) -> int:
    """`prod_st.teachers.cache.fill_missing`, split across ranks: the uncached keys, longest first, are dealt
    round-robin (every rank gets the same mix of lengths); each round every rank computes up to `chunk_size`
    of its own, and all ranks add every rank's values to the cache (rank 0 writes one shard per round, so a
    killed run keeps every finished round; the other ranks map it: `put_shared`). Every rank must call it with the same items. Returns the number
    of items this rank computed."""
    if world_size() == 1:
        return fill_missing(cache, items, compute, chunk_size=chunk_size, length=length, progress=progress, desc=desc)
    todo = cache.missing(items)
    counts = all_gather(len(todo))
    if not max(counts):
        return 0
    if len(set(counts)) > 1:  # a rank opened the cache while a shard appeared: all follow rank 0's list
        todo = all_gather(todo if rank() == 0 else None)[0]
    todo.sort(key=lambda k: (-length(items[k]), k))  # one order on every rank
    mine = todo[rank() :: world_size()]
    rounds = math.ceil(math.ceil(len(todo) / world_size()) / chunk_size)
    for i in range(rounds):
        keys = mine[i * chunk_size : (i + 1) * chunk_size]
        values = np.asarray(compute([items[k] for k in keys])) if keys else None
        parts = [(k, v) for k, v in all_gather((keys, values)) if k]
        cache.put_shared([key for share, _ in parts for key in share], np.concatenate([v for _, v in parts]))
    barrier()  # rank 0's shards are on disk before any rank reads the cache again
    logger.info("%s: rank %d of %d computed %d of %d new values", desc, rank(), world_size(), len(mine), len(todo))
    return len(mine)
