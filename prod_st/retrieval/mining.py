"""Hard-negative mining: retrieve each training query's top-k with a model (faiss), drop the positives, and
take N negatives from a rank window, sampled (PROD's stages) or hardest first (DPD).

The expensive part, the ranked top-k run, is cached per model checkpoint (weights fingerprint), corpus,
queries and settings, so re-mining with the same model (a resumed stage, another window) does no work, and the
corpus encoding behind it is the checkpoint's one shared encoding (`prod_st.retrieval.corpus_index`), which dev
evaluation, DPD and the test reuse. sentence-transformers' `mine_hard_negatives` works on texts and
re-encodes the corpus on every call; prod-st needs ids (qrels, DPD ranks) and the cached run, so it keeps
its own few lines around the same faiss search that evaluation uses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sentence_transformers import SentenceTransformer

from prod_st.data import RetrievalData
from prod_st.data.doc_ids import DocIds, doc_ids
from prod_st.retrieval.corpus_index import TRAIN_SIZE
from prod_st.retrieval.evaluation import build_index, search_rows
from prod_st.util.distributed import all_gather, is_main
from prod_st.util.fingerprint import model_fingerprint, text_key
from prod_st.util.paths import atomic_path, cache_dir, load_cached_array

logger = logging.getLogger(__name__)
Strategy = Literal["sample", "hardest"]
RELEVANT_BLOCK = 32_768  # queries per block when a run's ranks are matched with the judgements (x 200 ranks: 50 MB)


@dataclass(frozen=True)
class NegativeWindow:
    """Where negatives come from in a query's ranking: 1-based ranks `start..end` (inclusive, counted
    over the retrieved list, positives included), `count` of them, sampled or hardest first."""

    start: int = 1
    end: int = 100
    count: int = 15
    strategy: Strategy = "sample"

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.end:
            raise ValueError(f"negative window needs 1 <= start <= end, got {self.start}..{self.end}")
        if self.count < 1:
            raise ValueError(f"negative count must be >= 1, got {self.count}")


class RankedRun(Mapping[str, list[str]]):
    """Each query's retrieved doc ids, best first, as a read-only mapping {query id: [doc id, ...]}, held as one
    (queries, k) int32 array of corpus rows (memory-mapped from the cache; -1 where fewer were found): a
    query's list of ids is made when it is read, so 500k queries x 200 ranks cost 400 MB of array, not 100M
    Python references."""

    def __init__(self, query_ids: list[str], rows: np.ndarray, ids: DocIds) -> None:
        if len(query_ids) != len(rows):
            raise ValueError(f"{len(query_ids)} queries but {len(rows)} rows of ranks")
        self.rows, self._ids = rows, ids
        self._position = {q: i for i, q in enumerate(query_ids)}

    def __getitem__(self, qid: str) -> list[str]:
        row = np.asarray(self.rows[self._position[qid]])
        return self._ids.take(row[row >= 0])

    def __iter__(self) -> Iterator[str]:
        return iter(self._position)

    def __len__(self) -> int:
        return len(self._position)

    def positions(self, qids: list[str]) -> np.ndarray:
        """The row of `rows` of each query of `qids`."""
        return np.fromiter(map(self._position.__getitem__, qids), dtype=np.int64, count=len(qids))

    def first_relevant_ranks(self, qrels: Mapping[str, Mapping[str, int]]) -> np.ndarray:
        """Per query, in order: the 1-based rank of its first relevant document (grade > 0), 0 where it retrieved
        none. From the arrays (`relevant_blocks`): no list of ids per query."""
        out = np.zeros(len(self), dtype=np.int32)
        for first, hits in self.relevant_blocks(qrels):
            out[first:first + len(hits)] = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)
        return out

    def relevant_blocks(self, qrels: Mapping[str, Mapping[str, int]],
                        columns: slice = slice(None)) -> Iterator[tuple[int, np.ndarray]]:
        """(first query, (queries, ranks) bool) for RELEVANT_BLOCK queries at a time: whether the document at
        each rank of `columns` is relevant to its query (grade > 0 in `qrels`; a -1 padding never is). The
        judgements become one sorted array of `query * documents + row` keys that each block is searched
        in: 8 bytes per judgement, not a set per query."""
        documents = len(self._ids)
        judged = self._relevant_keys(qrels, documents)
        for first in range(0, len(self), RELEVANT_BLOCK):
            rows = np.asarray(self.rows[first:first + RELEVANT_BLOCK, columns], dtype=np.int64)
            keys = np.arange(first, first + len(rows), dtype=np.int64)[:, None] * documents + rows
            at = np.minimum(np.searchsorted(judged, keys), max(len(judged) - 1, 0))
            yield first, (rows >= 0) & (judged[at] == keys) if len(judged) else np.zeros(rows.shape, bool)

    def _relevant_keys(self, qrels: Mapping[str, Mapping[str, int]], documents: int) -> np.ndarray:
        """Sorted `query position * documents + corpus row` of every relevant (query, document) judgement of
        this run's queries (documents outside the corpus are left out: no run can retrieve them)."""
        positions, relevant = [], []
        for i, qid in enumerate(self._position):  # a pass over the judgements (a few per query), no documents
            for doc_id, grade in qrels.get(qid, {}).items():
                if grade > 0:
                    positions.append(i)
                    relevant.append(doc_id)
        rows = self._ids.find(relevant)
        keys = np.asarray(positions, dtype=np.int64) * documents + rows
        return np.unique(keys[rows >= 0])


def retrieve_ranked(
    model: SentenceTransformer,
    data: RetrievalData,
    queries: dict[str, str],
    *,
    top_k: int = 100,
    index_factory: str = "Flat",
    batch_size: int = 64,
    dtype: str = "float32",
    index_train_size: int = TRAIN_SIZE,
    search_backend: str = "auto",
    progress: bool = True,
) -> RankedRun:
    """Each query's top-`top_k` doc ids in rank order (a `RankedRun`), cached on disk as the corpus rows. Under
    torchrun every rank calls it: the corpus encoding and the search are split across ranks (`build_index`,
    `search_rows`); rank 0 writes the run. The key holds what changes the ranks (not `search_backend`: torch and
    faiss find the same top-k, ties aside); `index_train_size` only when not the default."""
    settings = {"top_k": top_k, "index": index_factory} | ({"dtype": dtype} if dtype != "float32" else {})
    settings |= {"index_train_size": index_train_size} if index_train_size != TRAIN_SIZE else {}
    key = text_key(
        model_fingerprint(model), data.corpus._fingerprint, *(f"{q}\t{t}" for q, t in queries.items()),
        settings=settings,
    )
    path = cache_dir("runs") / f"{key}.npy"
    cached = load_cached_array(path, rows=len(queries))  # (None when missing, or damaged: then removed)
    if all(all_gather(cached is not None)):  # decided together: every rank reads it, or every rank takes its share
        logger.info("ranked run for %d queries read from cache", len(queries))
        return RankedRun(list(queries), cached, doc_ids(data.corpus))
    index, ids = build_index(model, data.corpus, index_factory=index_factory, batch_size=batch_size, dtype=dtype,
                             index_train_size=index_train_size, search_backend=search_backend, progress=progress)
    _, rows = search_rows(model, index, list(queries.values()), top_k=top_k, batch_size=batch_size,
                          progress=progress)
    rows = rows.astype(np.int32)
    if is_main():
        with atomic_path(path, ".npy") as tmp:  # a killed process never leaves a half-written run
            np.save(tmp, rows)
    return RankedRun(list(queries), rows, ids)


class NegativePools(Mapping[str, list[str]]):
    """Each query's candidate negatives: ranks `window.start..window.end` of its ranking, in rank order,
    relevant documents (grade > 0) excluded. A read-only mapping over the ranked run: a query's pool is made
    when it is read (each epoch's draw reads them one at a time), so no list of candidates is kept per query."""

    def __init__(self, ranked: Mapping[str, list[str]], qrels: dict[str, dict[str, int]], window: NegativeWindow):
        self.ranked, self.qrels, self.window = ranked, qrels, window

    def __getitem__(self, qid: str) -> list[str]:
        relevant = {d for d, grade in self.qrels.get(qid, {}).items() if grade > 0}
        return [d for d in self.ranked[qid][self.window.start - 1 : self.window.end] if d not in relevant]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranked)

    def __len__(self) -> int:
        return len(self.ranked)

    def sizes(self) -> np.ndarray:
        """Each query's pool size, in order: from the run's arrays when it is a `RankedRun` (ranks found in the
        window minus the relevant ones among them, no list of ids per query), else from the pools."""
        if not isinstance(self.ranked, RankedRun):
            return np.fromiter((len(pool) for pool in self.values()), dtype=np.int64, count=len(self))
        window = slice(self.window.start - 1, self.window.end)
        found = (np.asarray(self.ranked.rows[:, window]) >= 0).sum(axis=1)
        relevant = np.zeros(len(self), dtype=np.int64)
        for first, hits in self.ranked.relevant_blocks(self.qrels, window):
            relevant[first:first + len(hits)] = hits.sum(axis=1)
        return found - relevant


def negative_pools(
    ranked: Mapping[str, list[str]], qrels: dict[str, dict[str, int]], window: NegativeWindow
) -> NegativePools:
    """Each query's candidate negatives (`NegativePools`): negatives are drawn from them (`draw_negatives`)."""
    return NegativePools(ranked, qrels, window)


def draw_negatives(
    pools: Mapping[str, list[str]], window: NegativeWindow, *, seed: int = 0, epoch: int = 0
) -> dict[str, list[str]]:
    """`window.count` negatives per query from its pool: "hardest" keeps rank order; "sample" draws uniformly
    without replacement, seeded per (seed, epoch, query), so every epoch reads a fresh, reproducible draw."""
    negatives = {}
    for qid, pool in pools.items():
        if window.strategy == "sample" and len(pool) > window.count:
            picked = set(random.Random(f"{seed}:{epoch}:{qid}").sample(range(len(pool)), window.count))
            pool = [d for i, d in enumerate(pool) if i in picked]  # sampled, still in rank order
        negatives[qid] = pool[: window.count]
    return negatives


def pick_negatives(
    ranked: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    window: NegativeWindow,
    *,
    seed: int = 0,
    epoch: int = 0,
) -> dict[str, list[str]]:
    """Negatives per query from `window` of its ranking, relevant documents excluded (one epoch's draw)."""
    return draw_negatives(negative_pools(ranked, qrels, window), window, seed=seed, epoch=epoch)


def mine_pools(
    model: SentenceTransformer,
    data: RetrievalData,
    window: NegativeWindow = NegativeWindow(),
    *,
    top_k: int | None = None,
    query_ids: list[str] | None = None,
    relevance: Callable[[dict[str, list[str]]], dict[str, dict[str, int]]] | None = None,
    **retrieve_kwargs,
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """(negative pools, relevance) of the judged queries of `data.split` (or `query_ids`), mined with `model`.
    `relevance(ranked)` gives the judgements that decide what is a positive (default: `data.qrels`; for
    question answering, the gold passages plus every retrieved passage that contains an answer); a query
    whose pool is smaller than `window.count` is counted in one warning."""
    queries = data.split_queries()
    if query_ids is not None:
        queries = {q: queries[q] for q in query_ids}
    ranked = retrieve_ranked(model, data, queries, top_k=top_k or window.end, **retrieve_kwargs)
    qrels = relevance(ranked) if relevance is not None else data.qrels
    pools = negative_pools(ranked, qrels, window)
    short = int((pools.sizes() < window.count).sum())
    if short:
        logger.warning("%d of %d queries have fewer than %d negatives in ranks %d..%d",
                       short, len(pools), window.count, window.start, window.end)
    return pools, qrels


def mine_negatives(
    model: SentenceTransformer,
    data: RetrievalData,
    window: NegativeWindow = NegativeWindow(),
    *,
    seed: int = 0,
    epoch: int = 0,
    **kwargs,
) -> dict[str, list[str]]:
    """Hard negatives (one epoch's draw) for the judged queries of `data.split` (or those of `query_ids`),
    mined with `model`."""
    return draw_negatives(mine_pools(model, data, window, **kwargs)[0], window, seed=seed, epoch=epoch)
