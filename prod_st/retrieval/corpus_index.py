"""A corpus encoded once per model checkpoint: every step that searches the corpus with the same weights (dev
evaluation, the next stage's mining, DPD's retrieval, the final test, a teacher's evaluation) reads the same
cached document embeddings and builds its faiss index from them.

The embeddings live in the prod-st cache under `corpus/<key>/block-NNNNNN.npy`, `key` = the model's
fingerprint (weights and settings, `prod_st.util.fingerprint`) + the corpus's fingerprint + role and
normalisation + dtype. The corpus is cut into fixed blocks of `block_size` documents; under torchrun each rank
encodes a contiguous run of blocks (`prod_st.util.distributed.shard`) and writes each one atomically, then every rank
reads them all (memory-mapped). A killed encoding keeps its finished blocks; a rerun, with any number of
processes, encodes only the missing ones. The index is built per process from the blocks: the whole corpus on
one process; under torchrun each rank's own share of blocks (`corpus_index`). It is a faiss index, or on a GPU
for exact search a `prod_st.retrieval.exact_search.TorchFlatIndex` (recipe `eval.search`: auto | torch | faiss)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from functools import partial

import faiss
import numpy as np
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from prod_st.data import document_text
from prod_st.data.doc_ids import DocIds, doc_ids
from prod_st.retrieval.encoding import encode_texts, is_cosine
from prod_st.retrieval.exact_search import EXACT, TorchFlatIndex, uses_torch
from prod_st.util import locks
from prod_st.util.distributed import barrier, is_main, rank, shard, world_size
from prod_st.util.errors import ProdStError
from prod_st.util.fingerprint import model_fingerprint, text_key
from prod_st.util.paths import atomic_path, cache_dir, cache_path, load_cached_array

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32768  # documents per cached block at most (fewer when that gives every rank a share)
TRAIN_SIZE = 32768  # vectors a trained faiss index (IVF, PQ) learns from: a seeded random sample of the corpus
SAMPLE_SEED = 0  # the training sample's seed: every rank, and every checkpoint, draws the same rows
DTYPES = ("float32", "float16")

# Documents this process encoded, per cache key: the tests read it (a corpus
# encoded once per checkpoint adds len(corpus) once per key).
encoded_docs: Counter[str] = Counter()
_last_index: dict = {}  # the last index built (one entry): consecutive steps with one checkpoint reuse it


def cache_key(model: SentenceTransformer, corpus, dtype: str = "float32") -> str:
    """What identifies one encoding of `corpus`: model fingerprint, corpus fingerprint, role, normalisation,
    dtype."""
    if dtype not in DTYPES:
        raise ProdStError(f"corpus embeddings dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return text_key(model_fingerprint(model), corpus._fingerprint,
                    settings={"role": "document", "normalize": is_cosine(model), "dtype": dtype})


def corpus_embeddings(
    model: SentenceTransformer,
    corpus,
    *,
    batch_size: int = 64,
    dtype: str = "float32",
    block_size: int | None = None,
    progress: bool = True,
    key: str | None = None,
) -> list[np.ndarray]:
    """The document embeddings of `corpus` (an Arrow table with _id/title/text) in corpus order, as
    memory-mapped (block, dim) arrays of `dtype`, normalised for cosine models. Encoded only when the cache
    lacks them; under torchrun each rank encodes its share of the missing blocks and all return once every
    block is written. Blocks hold `block_size` documents (default: BLOCK_SIZE, or fewer so that every rank
    gets some; a complete set written by a run with another number of processes is read as it is)."""
    key = key or cache_key(model, corpus, dtype)
    folder = cache_dir("corpus", key)
    n = len(corpus)
    block_size = block_size or _complete_layout(folder, n) or min(BLOCK_SIZE, max(1, -(-n // world_size())))
    blocks = [(start, min(n, start + block_size)) for start in range(0, n, block_size)]
    paths = [folder / f"block-{i:06d}-of-{len(blocks):06d}-{block_size}.npy" for i in range(len(blocks))]
    first, last = shard(len(blocks))
    locks.use(folder)  # no other run removes this encoding while this process reads it
    # (a damaged block, unreadable or of the wrong length, is removed here and encoded again)
    todo = [i for i in range(first, last) if load_cached_array(paths[i], blocks[i][1] - blocks[i][0]) is None]
    if todo:
        docs = sum(blocks[i][1] - blocks[i][0] for i in todo)
        who = f" (rank {rank()} of {world_size()})" if world_size() > 1 else ""
        logger.info("encoding %d of %d documents%s into %s", docs, n, who, folder)
        with tqdm(total=docs, desc="Encoding corpus", unit="doc", disable=not progress) as bar:
            for i in todo:
                start, stop = blocks[i]
                rows = corpus[start:stop]
                texts = [document_text(t, x) for t, x in zip(rows["title"], rows["text"])]
                vectors = encode_texts(model, texts, "document", batch_size).astype(dtype, copy=False)
                with atomic_path(paths[i], ".npy") as tmp:  # a killed process never leaves half a block
                    np.save(tmp, vectors)
                encoded_docs[key] += len(texts)
                bar.update(len(texts))
    else:
        logger.info("corpus embeddings (%d documents) read from the cache", n)
    barrier()  # every rank's blocks are written (ranks encode equal shares, so nobody waits long)
    return [np.load(path, mmap_mode="r") for path in paths]


def rows_of(blocks: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(len(rows), dim) float32 vectors of corpus `rows` from `corpus_embeddings`'s blocks (all of one size but
    the last): only the pages holding them are read."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), blocks[0].shape[1] if blocks else 0), np.float32)
    if not len(rows):
        return out
    size = len(blocks[0])
    which = rows // size
    for b in np.unique(which).tolist():
        picked = which == b
        out[picked] = blocks[b][rows[picked] - b * size]
    return out


def release(key: str) -> None:
    """Remove one cached corpus encoding (rank 0; every rank calls it): a checkpoint no later step searches
    with (at MS MARCO size, 27 GB per checkpoint in float32)."""
    if _last_index.get("memo", ("",))[0] == key:
        _last_index.clear()
    folder = cache_path("corpus", key)
    if not is_main():
        locks.drop(folder)
    barrier()  # every rank of this run has let go; another run still reading it keeps it
    if is_main():
        locks.remove_unless_used(folder, lambda f: shutil.rmtree(f, ignore_errors=True))
    barrier()


def _complete_layout(folder, n: int) -> int | None:
    """The block size of a complete set of blocks already in `folder` (written by a run with another number of
    processes), or None."""
    for size in sorted({int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("block-*-of-*-*.npy")}):
        count = -(-n // size)
        if all((folder / f"block-{i:06d}-of-{count:06d}-{size}.npy").exists() for i in range(count)):
            return size
    return None


def new_index(dim: int, index_factory: str, num_vectors: int, training: int) -> faiss.Index:
    """An empty faiss inner-product index from a factory string; one line when the string is invalid or when a
    trained index could not learn its lists from `training` vectors."""
    try:
        index = faiss.index_factory(dim, index_factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise ProdStError(f"invalid faiss index factory string {index_factory!r} (try 'Flat' or 'HNSW32')") from None
    ivf = faiss.try_extract_index_ivf(index)
    if not index.is_trained and ivf is not None and training < ivf.nlist:
        raise ProdStError(
            f"faiss index {index_factory!r} needs at least {ivf.nlist} vectors to train its {ivf.nlist} lists, but "
            f"it trains on {training} (the corpus has {num_vectors} documents): use 'Flat' or fewer lists"
        )
    return index


def train_index(index: faiss.Index, index_factory: str, vectors: np.ndarray) -> None:
    """Train `index` on `vectors`; faiss's refusal (too few vectors for its quantizers) becomes one line."""
    try:
        index.train(vectors)
    except RuntimeError as e:
        reason = " ".join(str(e).split()).rsplit("failed: ", 1)[-1]
        raise ProdStError(f"faiss cannot train index {index_factory!r} on {len(vectors)} vectors ({reason}): use "
                          "'Flat' or a smaller index") from None


def training_rows(num_vectors: int, size: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """The sorted corpus rows a trained index learns from: `size` rows drawn at random (seeded) across the whole
    corpus, or every row when the corpus is that small. Not the first rows: a corpus in file order is grouped
    (NQ's passages come article by article), and centroids learnt from its head would fit a few topics."""
    if size >= num_vectors:
        return np.arange(num_vectors, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(num_vectors, size, replace=False)).astype(np.int64)


_faiss_threads: list[int] = []  # the thread count set once under a launcher


def set_faiss_threads() -> int:
    """faiss's OpenMP threads under a launcher (LOCAL_WORLD_SIZE set): this process's share of the cores it may
    run on, `cores // local ranks`. torchrun sets OMP_NUM_THREADS=1 for every rank, which would leave each rank's
    faiss search on one core; set once per process, and logged. Without a launcher faiss keeps its default."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None or _faiss_threads:
        return faiss.omp_get_max_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, int(local)))
    faiss.omp_set_num_threads(threads)
    _faiss_threads.append(threads)
    logger.info("faiss searches with %d threads (%d cores, %s local ranks)", threads, cores, local)
    return threads


def corpus_index(
    model: SentenceTransformer,
    corpus,
    *,
    index_factory: str = "Flat",
    batch_size: int = 64,
    dtype: str = "float32",
    train_size: int = TRAIN_SIZE,
    search_backend: str = "auto",
    progress: bool = True,
) -> tuple[faiss.Index | TorchFlatIndex, DocIds]:
    """(inner-product index of the corpus's cached embeddings, doc ids in corpus order: `DocIds`).
    `search_backend` picks the backend (`prod_st.retrieval.exact_search.uses_torch`): "auto" searches an exact index (Flat,
    SQfp16) with torch on a GPU (a `TorchFlatIndex` over the blocks, ids = corpus rows) and everything else with
    faiss; "torch" / "faiss" force one. A trained faiss index (IVF, PQ) trains on `train_size` vectors drawn at
    random across the corpus (`training_rows`). On one process the index holds the whole corpus, a vector's faiss id
    being its corpus row. Under torchrun each rank indexes only its own share of the blocks (the ones it
    encoded) in a `faiss.IndexIDMap` whose ids are the corpus rows, so the ranks of a node hold one copy of the
    index between them; `prod_st.retrieval.evaluation.search_rows` searches every rank's share and merges. The last index
    built is kept, so back-to-back steps with one checkpoint (dev evaluation, then the next stage's mining)
    search the same index."""
    key = cache_key(model, corpus, dtype)
    on_torch = uses_torch(search_backend, index_factory)
    memo = (key, index_factory, train_size, on_torch)
    if _last_index.get("memo") == memo:
        return _last_index["index"], _last_index["ids"]
    _last_index.clear()
    dim = model.get_embedding_dimension()
    training = min(len(corpus), train_size)
    # (a bad factory fails before encoding)
    index = None if on_torch else new_index(dim, index_factory, len(corpus), training)
    blocks = corpus_embeddings(model, corpus, batch_size=batch_size, dtype=dtype, progress=progress, key=key)
    first, last = shard(len(blocks))  # (every block on one process)
    row = sum(len(b) for b in blocks[:first])
    if on_torch:
        index = TorchFlatIndex(blocks[first:last], row, dtype=EXACT[index_factory])
        logger.info("exact search with torch on %s (%s)", index.device, index_factory)
    else:
        set_faiss_threads()
        if not index.is_trained:  # every rank trains on the same sample
            sample = rows_of(blocks, training_rows(len(corpus), training))
            train_index(index, index_factory, sample)
            del sample
        if world_size() > 1:
            shard_index = faiss.IndexIDMap(index)  # (keeps a reference to `index`)
            for block in blocks[first:last]:
                shard_index.add_with_ids(np.ascontiguousarray(block, dtype=np.float32),
                                         np.arange(row, row + len(block), dtype=np.int64))
                row += len(block)
            index = shard_index
        else:
            for block in blocks:
                index.add(np.ascontiguousarray(block, dtype=np.float32))
    ids = doc_ids(corpus)
    _last_index.update(memo=memo, index=index, ids=ids)
    return index, ids


def document_lookup(student: SentenceTransformer, corpus, *, progress: bool = True, **search):
    """Corpus rows -> `student`'s document vectors, read from its cached corpus encoding (built by this stage's
    mining or the last dev evaluation; encoded again, shared across ranks, only if it was pruned). `search`: the
    run's corpus search settings (`batch_size`, `dtype` used; the rest ignored)."""
    blocks = corpus_embeddings(student, corpus, batch_size=search["batch_size"], dtype=search["dtype"],
                               progress=progress)
    return partial(rows_of, blocks)
