"""Exact corpus search: faiss Flat (what CPU runs use) against torch's block-wise matmul + topk
(`prod_st.retrieval.exact_search.TorchFlatIndex`, what `eval.search: auto` uses on a GPU), on random unit vectors laid out
as the corpus cache lays them out (memory-mapped .npy blocks of 32,768 rows). Prints one JSON line: the cost of
each in us per query per million documents, and how far they agree (the share of each query's top-k rows found
by both, the largest score difference).

    # CPU (the torch path on the CPU, to check it; a GPU is what it is for):
    PYTHONPATH=.:cli python bench/search_bench.py --docs 200000 --dim 384 --queries 1000 --top-k 100
    # GPU (faiss stays on the CPU's cores; --fp16-matmul adds a plain float16 matmul + topk for comparison):
    PYTHONPATH=.:cli python bench/search_bench.py --docs 1000000 --dim 768 --queries 10000 --top-k 100 \
        --device cuda --faiss-queries 1000 --fp16-matmul
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np
import torch
from harness import Timer

from prod_st.retrieval.corpus_index import BLOCK_SIZE
from prod_st.retrieval.exact_search import TorchFlatIndex


def blocks_on_disk(folder: Path, docs: int, dim: int, dtype: str, seed: int = 0) -> list[np.ndarray]:
    """`docs` random unit vectors as memory-mapped blocks of BLOCK_SIZE rows, written block by block."""
    rng = np.random.default_rng(seed)
    blocks = []
    for i, start in enumerate(range(0, docs, BLOCK_SIZE)):
        x = rng.standard_normal((min(BLOCK_SIZE, docs - start), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(folder / f"block-{i:06d}.npy", x.astype(dtype))
        blocks.append(np.load(folder / f"block-{i:06d}.npy", mmap_mode="r"))
    return blocks


def per_query_per_million(seconds: float, queries: int, docs: int) -> float:
    return seconds / queries / (docs / 1e6) * 1e6


def fp16_matmul(blocks, queries: np.ndarray, k: int, device: str) -> float:
    """Seconds of a plain float16 matmul + topk over the same blocks (the tensor-core path not taken: it rounds
    queries and scores to float16), one block at a time, per 2,048 queries; for comparison only."""
    on_device = [torch.from_numpy(np.asarray(b, dtype=np.float16)).to(device) for b in blocks]
    q = torch.from_numpy(queries).to(device, torch.float16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    with Timer() as wall:
        for begin in range(0, len(q), 2048):
            chunk = q[begin:begin + 2048]
            tops = [torch.topk(chunk @ b.T, k, dim=1) for b in on_device]
            torch.topk(torch.cat([t.values for t in tops], 1), k, dim=1)
        sync()
    return wall.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--faiss-queries", type=int, help="queries faiss searches (default: all; fewer on a GPU run)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="corpus cache dtype")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads (both)")
    parser.add_argument("--fp16-matmul", action="store_true", help="also time a float16 matmul + topk (GPU)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    queries = np.random.default_rng(1).standard_normal((args.queries, args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    n_faiss = min(args.faiss_queries or args.queries, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        blocks = blocks_on_disk(Path(tmp), args.docs, args.dim, args.dtype)
        index = faiss.IndexFlatIP(args.dim)
        for b in blocks:
            index.add(np.ascontiguousarray(b, dtype=np.float32))
        with Timer() as faiss_s:
            faiss_scores, faiss_rows = index.search(queries[:n_faiss], args.top_k)

        flat = TorchFlatIndex(blocks, device=args.device)
        with Timer() as upload_s:
            flat._device_blocks()  # the copy to the device, once per search_rows call
        flat.search(queries[:10], args.top_k)  # (warm-up: kernels, allocator)
        with Timer() as torch_s:
            scores, rows = flat.search(queries, args.top_k)
        fp16_s = fp16_matmul(blocks, queries, args.top_k, args.device) if args.fp16_matmul else None

    same = [len(np.intersect1d(a, b)) / args.top_k for a, b in zip(rows[:n_faiss], faiss_rows)]
    result = {
        "docs": args.docs, "dim": args.dim, "queries": args.queries, "faiss_queries": n_faiss, "top_k": args.top_k,
        "dtype": args.dtype, "device": str(flat.device), "threads": args.threads,
        "faiss_flat_us_per_query_per_M": round(per_query_per_million(faiss_s.seconds, n_faiss, args.docs), 1),
        "torch_us_per_query_per_M": round(per_query_per_million(torch_s.seconds, args.queries, args.docs), 2),
        "torch_upload_s": round(upload_s.seconds, 3),
        "top_k_rows_shared": round(float(np.mean(same)), 6),
        "queries_with_identical_rows": round(float(np.mean((rows[:n_faiss] == faiss_rows).all(1))), 4),
        "max_score_diff": float(np.abs(scores[:n_faiss] - faiss_scores).max()),
    }
    if fp16_s is not None:
        result["fp16_matmul_topk_us_per_query_per_M"] = round(per_query_per_million(fp16_s, args.queries, args.docs), 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
