"""Exact inner-product search with torch: on a GPU, the corpus search of every step (dev evaluation, mining, DPD's
retrieval, the final test, a teacher's evaluation, `prod-st eval`) is a block-wise matmul + top-k instead of
faiss on the CPU (measured on an H200: faiss-cpu Flat 7,103 us per query per million documents on 16 cores, a
torch matmul + topk 9.45 us). faiss stays for CPU runs and for approximate indexes (HNSW, IVF, PQ).

`TorchFlatIndex` answers what prod-st asks of a faiss index (`ntotal`, `search(vectors, k)` -> (scores, rows))
over the cached corpus blocks of `prod_st.retrieval.corpus_index`, so `prod_st.retrieval.evaluation.search_rows` and its merge
across ranks are the same for both. Its ids are global corpus rows (like the IndexIDMap of a rank's share).

Numbers: the vectors are kept on the device as the cache stores them (float16 for `corpus_dtype: float16` or
index SQfp16, else float32) and every product is computed in float32 with TF32 off, so the scores are what
faiss Flat / SQfp16 computes (fp32 dot products of the stored vectors) up to summation order: the same top-k,
ties aside, on a GPU as on the CPU run that mined the same negatives. float16 products on tensor cores would be
some 3x faster on the matmul, but they round every query and score to 11 bits (1e-3 on a cosine), reordering
near ties. At an H200's float32 rate the fp32 search should cost some 25-30 us per query per million documents
of dim 768 (an estimate, not measured yet: `bench/search_bench.py --device cuda` measures both), still some 200x
faster than faiss here.

Memory: nothing (queries x corpus) is ever made: queries go through in chunks whose score matrix against one
block holds at most SCORE_ELEMENTS numbers, and each block's top-k is merged into the chunk's running top-k.
The device copy of the blocks lives from the first search to `release()` (`search_rows` releases it when a
search is done, so training never shares the GPU with a corpus); a share of the corpus too big for the GPU is
one line saying what to set instead."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch

from prod_st.util.errors import ProdStError

BACKENDS = ("auto", "torch", "faiss")
EXACT = {"Flat": None, "SQfp16": torch.float16}  # faiss factory strings torch computes exactly -> vectors' dtype
SCORE_ELEMENTS = 1 << 26  # scores of one query chunk against one block (256 MB of float32)


def uses_torch(search: str, index_factory: str) -> bool:
    """Whether the corpus search runs on torch: `search` "torch" (an exact index only), "faiss", or "auto" =
    torch when a GPU is visible and the index is exact (Flat, SQfp16), faiss otherwise."""
    if search not in BACKENDS:
        raise ProdStError(f"search must be one of {', '.join(BACKENDS)}, got {search!r}")
    if search == "torch" and index_factory not in EXACT:
        raise ProdStError(f"search 'torch' is exact search only (index {' or '.join(EXACT)}), not {index_factory!r}")
    return search == "torch" or (search == "auto" and index_factory in EXACT and torch.cuda.is_available())


def search_device() -> torch.device:
    """The GPU of this process (the one torchrun's rank was given) if there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class TorchFlatIndex:
    """Exact inner-product search over `blocks` (memory-mapped (n, dim) arrays, consecutive corpus rows from
    `first_row` on), as torch tensors on `device` of `dtype` (None: the blocks' own, float16 or float32)."""

    def __init__(self, blocks: list[np.ndarray], first_row: int = 0, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        self.blocks, self.first_row = blocks, first_row
        self.ntotal = sum(len(b) for b in blocks)
        self.device = torch.device(device) if device is not None else search_device()
        self.dtype = dtype
        self._on_device: list[torch.Tensor] | None = None

    def _device_blocks(self) -> list[torch.Tensor]:
        if self._on_device is None:
            dtypes = [self.dtype or _storage_dtype(b.dtype) for b in self.blocks]
            try:
                self._on_device = [_upload(b, self.device, dtype) for b, dtype in zip(self.blocks, dtypes)]
            except torch.cuda.OutOfMemoryError:
                size = sum(b.size * dtype.itemsize for b, dtype in zip(self.blocks, dtypes)) / 2**30
                raise ProdStError(
                    f"the corpus's {size:.1f} GB of vectors do not fit on {self.device}: set eval.search: faiss "
                    "(prod-st eval --search faiss), halve them (eval.corpus_dtype: float16), or search on more GPUs "
                    "(under torchrun each holds its share)"
                ) from None
        return self._on_device

    def release(self) -> None:
        """Drop the device copy of the blocks (the next search makes it again)."""
        self._on_device = None

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of each query's top-`k`, best first, ties by lower row first: two (queries, k) arrays,
        float32 and int64, padded with -inf / -1 past `ntotal` (as faiss pads)."""
        queries = np.asarray(vectors, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, np.float32)
        rows = np.full((len(queries), k), -1, np.int64)
        blocks = self._device_blocks()
        if not len(queries) or not blocks or k < 1:
            return scores, rows
        chunk = max(1, SCORE_ELEMENTS // max(len(b) for b in blocks))
        with _fp32_matmul():
            for begin in range(0, len(queries), chunk):
                q = torch.from_numpy(queries[begin:begin + chunk]).to(self.device)
                best, best_rows = self._chunk_top(q, blocks, k)
                scores[begin:begin + len(q), :best.shape[1]] = best.cpu().numpy()
                rows[begin:begin + len(q), :best.shape[1]] = best_rows.cpu().numpy()
        return scores, rows

    def _chunk_top(self, q: torch.Tensor, blocks: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One query chunk's top-k over every block: each block's top-k merged into the running one."""
        best = torch.empty((len(q), 0), dtype=torch.float32, device=self.device)
        best_rows = torch.empty((len(q), 0), dtype=torch.int64, device=self.device)
        start = self.first_row
        for block in blocks:
            if len(block):
                s = q @ block.to(torch.float32).T
                top, idx = torch.topk(s, min(k, s.shape[1]), dim=1)
                top, idx = _by_score_then_row(top, idx + start)
                # running rows are all lower than this block's: a stable sort keeps them first among ties
                best, best_rows = _stable_desc(torch.cat([best, top], 1), torch.cat([best_rows, idx], 1), k)
            start += len(block)
        return best, best_rows


def _upload(block: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memory map: read, never written
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(np.asarray(block)).to(device, dtype)


def _storage_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32


def _by_score_then_row(scores: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of (scores, rows) ordered by score, best first, then by lower row (topk leaves ties unordered)."""
    rows, order = torch.sort(rows, dim=1)
    return _stable_desc(torch.gather(scores, 1, order), rows, scores.shape[1])


def _stable_desc(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `k` of each row by score, best first; equal scores keep their order."""
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :k], torch.gather(rows, 1, order[:, :k])


@contextmanager
def _fp32_matmul():
    """float32 products in full float32 during the search: a trainer's `tf32: true` must not round the scores."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
