"""What a rank other than 0 holds of a teacher cache (issue 18 item 3): 2 gloo ranks (spawned, CPU) fill one
EmbeddingCache with `fill_missing_shared`, as a bi-encoder teacher's embeddings are filled under torchrun, and
each reports how much its RssAnon (own memory, not mapped file pages) grew. Run it with PYTHONPATH on the
checkout to measure (before / after).

    python bench/rank_cache_memory.py [--items 200000] [--dim 384] [--chunk 8192]

Prints one JSON line per rank: RssAnon growth (MB) and the cache's size on disk (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch.multiprocessing as mp


def anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rank_main(rank: int, port: int, folder: str, items: int, dim: int, chunk: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    from prod_st.teachers.cache import EmbeddingCache
    from prod_st.teachers.sharded import fill_missing_shared
    from prod_st.util import distributed

    distributed.init_if_launched()
    texts = {f"text {i}": i for i in range(items)}
    cache = EmbeddingCache(Path(folder) / "embeddings")
    rng = np.random.default_rng(rank)
    before = anon_mb()
    fill_missing_shared(cache, texts, lambda batch: rng.random((len(batch), dim), dtype=np.float32),
                        chunk_size=chunk, length=lambda i: i % 13, progress=False)
    grown = anon_mb() - before
    on_disk = sum(p.stat().st_size for p in (Path(folder) / "embeddings").glob("part-*")) / 2**20
    distributed.leave_group()
    print(json.dumps({"rank": rank, "rss_anon_growth_mb": round(grown), "cache_on_disk_mb": round(on_disk),
                      "items": items, "dim": dim}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk", type=int, default=8192)
    a = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(port, folder, a.items, a.dim, a.chunk), nprocs=2)


if __name__ == "__main__":
    main()
