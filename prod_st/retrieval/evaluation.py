"""Retrieval evaluation: encode with a SentenceTransformer, exact (or any faiss) inner-product search,
metrics through pytrec_eval."""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np
import pytrec_eval
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from prod_st.data import RetrievalData, load_retrieval_data
from prod_st.data.answer_match import top_k_accuracy
from prod_st.data.doc_ids import DocIds, doc_ids
from prod_st.retrieval.corpus_index import TRAIN_SIZE, corpus_index
from prod_st.retrieval.encoding import encode_texts
from prod_st.retrieval.exact_search import TorchFlatIndex
from prod_st.util.distributed import all_gather, is_main, shard, world_size
from prod_st.util.errors import ProdStError
from prod_st.util.progress import enabled

logger = logging.getLogger(__name__)

QUERY_CHUNK = 8192  # queries searched together under torchrun (each rank's top-k of a chunk are gathered)

# Display name -> (pytrec_eval measure, depth the run is cut to before measuring; None = whole run).
# pytrec_eval reports measure "ndcg_cut.10" under the key "ndcg_cut_10".
METRICS = {
    "nDCG@10": ("ndcg_cut.10", None),
    "MRR@10": ("recip_rank", 10),
    "R@10": ("recall.10", None),
    "R@50": ("recall.50", None),
    "R@100": ("recall.100", None),
    "R@1000": ("recall.1000", None),
    "MAP@1000": ("map_cut.1000", None),
}
Run = dict[str, dict[str, float]]


@dataclass
class EvalResult:
    metrics: dict[str, float]
    num_queries: int
    num_docs: int
    seconds: dict[str, float] = field(default_factory=dict)
    run: Run | None = None


def compute_metrics(qrels: dict[str, dict[str, int]], run: Run, relevance_level: int = 1) -> dict[str, float]:
    """Mean of each metric in METRICS over every judged query (a query absent from the run counts 0).
    Grades >= `relevance_level` are relevant for MRR, recall and MAP; nDCG uses the grades themselves as
    gains (trec_eval's linear gain, as BEIR reports it)."""
    if not qrels:
        raise ProdStError("no judged queries to evaluate (empty qrels)")
    require_positive(relevance_level=relevance_level)
    per_depth: dict[int | None, set[str]] = {}
    for measure, depth in METRICS.values():
        per_depth.setdefault(depth, set()).add(measure)
    totals = {name: 0.0 for name in METRICS}
    for depth, measures in per_depth.items():
        cut = run if depth is None else {q: _top(docs, depth) for q, docs in run.items()}
        evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=relevance_level)
        scores = evaluator.evaluate({q: docs for q, docs in cut.items() if q in qrels})
        for name, (measure, d) in METRICS.items():
            if d == depth:
                totals[name] = sum(s[measure.replace(".", "_")] for s in scores.values())
    return {name: total / len(qrels) for name, total in totals.items()}


def score_run(run: Run, data: RetrievalData, query_ids: list[str], relevance_level: int = 1) -> dict[str, float]:
    """Metrics of `run` over `query_ids`: the qrels metrics (METRICS) for judged queries, and DPR's top-k
    answer accuracy (Acc@5/20/100, answer string in a retrieved passage's text) when the data has answers."""
    qrels = {q: data.qrels[q] for q in query_ids if q in data.qrels}
    metrics = compute_metrics(qrels, run, relevance_level) if qrels or not data.answers else {}
    if data.answers:
        answers = {q: data.answers[q] for q in query_ids if q in data.answers}
        ranked = {q: sorted(docs, key=docs.get, reverse=True) for q, docs in run.items()}
        metrics |= top_k_accuracy(ranked, answers, passage_texts(data.corpus))
    return metrics


def passage_texts(corpus):
    """doc ids -> their texts (bodies, without titles: what DPR's answer matching reads)."""
    ids = doc_ids(corpus)
    return lambda wanted: corpus.select(ids.rows(wanted))["text"]


def require_positive(**values) -> None:
    """Each value given is an integer >= 1 (None: not set). A count or a level of 0 or below has no meaning
    here: refused at once rather than answered with a crash or with zeros."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
            raise ProdStError(f"{name} must be an integer of at least 1, got {value!r}")


def _top(docs: dict[str, float], k: int) -> dict[str, float]:
    return dict(sorted(docs.items(), key=lambda kv: kv[1], reverse=True)[:k])


def build_index(
    model: SentenceTransformer,
    corpus,
    *,
    index_factory: str = "Flat",
    batch_size: int = 64,
    dtype: str = "float32",
    index_train_size: int = TRAIN_SIZE,
    search_backend: str = "auto",
    progress: bool = True,
) -> tuple[faiss.Index | TorchFlatIndex, DocIds]:
    """An inner-product index of `corpus` (an Arrow table with _id/title/text) encoded by `model`, and the doc
    ids in index order (`prod_st.data.doc_ids.DocIds`). `index_factory` is any faiss factory string ("Flat" exact;
    "HNSW32", "IVF4096,Flat" for big corpora; a trained index is trained on `index_train_size` documents drawn
    at random across the corpus). `search_backend` "auto" runs an exact index (Flat, SQfp16) on torch when there
    is a GPU, faiss otherwise ("torch", "faiss": that one; `prod_st.retrieval.exact_search`). The encoding is cached per
    checkpoint and shared across ranks (`prod_st.retrieval.corpus_index`), as `dtype` ("float32" or "float16"): the same
    weights never encode the same corpus twice."""
    require_positive(batch_size=batch_size, index_train_size=index_train_size)
    return corpus_index(model, corpus, index_factory=index_factory, batch_size=batch_size, dtype=dtype,
                        train_size=index_train_size, search_backend=search_backend, progress=enabled(progress))


def search_rows(
    model: SentenceTransformer,
    index: faiss.Index | TorchFlatIndex,
    queries: list[str],
    *,
    top_k: int = 1000,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, corpus rows) of each query's top-`top_k` documents, best first: two (queries, k) arrays, row
    -1 where the index returned fewer. Under torchrun every rank calls it with its share of the corpus
    (`corpus_index`): the queries go through in chunks of QUERY_CHUNK; each rank encodes its share of a chunk,
    the chunk's vectors are gathered, every rank searches all of them in its share of the corpus, and each
    query's top-k of the ranks' top-k are kept (ties: lower row first). All ranks return the merged arrays. A
    `TorchFlatIndex` releases its device copy of the corpus when the search is done."""
    require_positive(top_k=top_k, batch_size=batch_size)
    try:
        return _search_rows(model, index, queries, top_k, batch_size, progress)
    finally:
        if isinstance(index, TorchFlatIndex):
            index.release()


def _search_rows(model, index, queries: list[str], top_k: int, batch_size: int, progress: bool):
    if world_size() == 1:
        k = min(top_k, index.ntotal)
        if not queries:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        vectors = encode_texts(model, queries, "query", batch_size, show_progress_bar=enabled(progress))
        return index.search(vectors, k)
    k = min(top_k, sum(all_gather(index.ntotal)))
    scores, rows = np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
    with tqdm(total=len(queries), desc="Searching", unit="query", disable=not enabled(progress) or not is_main()) as bar:
        for begin in range(0, len(queries), QUERY_CHUNK):
            chunk = queries[begin:begin + QUERY_CHUNK]
            start, stop = shard(len(chunk))
            mine = (encode_texts(model, chunk[start:stop], "query", batch_size) if stop > start
                    else np.zeros((0, model.get_embedding_dimension()), np.float32))
            vectors = np.ascontiguousarray(np.concatenate(all_gather(mine)), dtype=np.float32)
            found = index.search(vectors, min(k, index.ntotal)) if index.ntotal else (
                np.zeros((len(chunk), 0), np.float32), np.zeros((len(chunk), 0), np.int64))
            parts = all_gather(found)
            chunk_scores = np.concatenate([p[0] for p in parts], axis=1)
            chunk_rows = np.concatenate([p[1] for p in parts], axis=1)
            chunk_scores[chunk_rows < 0] = -np.inf  # faiss's filler for a short list
            order = np.lexsort((chunk_rows, -chunk_scores))[:, :k]  # by score, then row
            scores[begin:begin + len(chunk)] = np.take_along_axis(chunk_scores, order, axis=1)
            rows[begin:begin + len(chunk)] = np.take_along_axis(chunk_rows, order, axis=1)
            bar.update(len(chunk))
    rows[~np.isfinite(scores)] = -1
    return scores, rows


def search(
    model: SentenceTransformer,
    index: faiss.Index | TorchFlatIndex,
    ids: DocIds,
    queries: dict[str, str],
    *,
    top_k: int = 1000,
    progress: bool = True,
    **kwargs,
) -> Run:
    """Top-`top_k` documents per query as {query id: {doc id: score}} (`search_rows`, then the rows' ids)."""
    scores, rows = search_rows(model, index, list(queries.values()), top_k=top_k, progress=progress, **kwargs)
    return {
        qid: dict(zip(ids.take(row_ids[row_ids >= 0]), row_scores[row_ids >= 0].tolist()))
        for qid, row_ids, row_scores in zip(queries, rows, scores)
    }


def evaluate_model(
    model: SentenceTransformer,
    data: RetrievalData,
    *,
    top_k: int = 1000,
    index_factory: str = "Flat",
    batch_size: int = 64,
    dtype: str = "float32",
    index_train_size: int = TRAIN_SIZE,
    search_backend: str = "auto",
    relevance_level: int = 1,
    max_queries: int | None = None,
    keep_run: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Encode `data.corpus` (cached per checkpoint as `dtype`), retrieve for the judged queries of `data.split`
    (`build_index`'s `index_factory`, `index_train_size` and `search_backend`), and score the run."""
    require_positive(top_k=top_k, batch_size=batch_size, relevance_level=relevance_level, max_queries=max_queries)
    queries = data.split_queries()
    if max_queries is not None:
        queries = dict(list(queries.items())[:max_queries])
    if not queries:
        raise ProdStError(f"{data.name} ({data.split}): no queries to evaluate")
    start = time.perf_counter()
    index, ids = build_index(model, data.corpus, index_factory=index_factory, batch_size=batch_size, dtype=dtype,
                             index_train_size=index_train_size, search_backend=search_backend, progress=progress)
    encoded = time.perf_counter()
    run = search(model, index, ids, queries, top_k=top_k, batch_size=batch_size, progress=progress)
    searched = time.perf_counter()
    metrics = score_run(run, data, list(queries), relevance_level)
    seconds = {"encode_corpus": encoded - start, "search": searched - encoded, "total": time.perf_counter() - start}
    logger.info("evaluated %d queries over %d docs in %.1fs", len(queries), len(ids), seconds["total"])
    return EvalResult(metrics, len(queries), len(ids), seconds, run if keep_run else None)


def load_beir_sets(names: list[str], split: str = "test") -> list[RetrievalData]:
    """`split` of each BEIR set (a BEIR name, downloaded once with beir's utility, or a local BEIR-format
    folder), all loaded before any is evaluated: a missing or malformed set fails before the long work."""
    if not names:
        raise ProdStError("no BEIR set given: name one or more, comma-separated (e.g. scifact,nfcorpus)")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise ProdStError(f"BEIR set {repeated!r} is given twice")
    return [load_retrieval_data(name, split) for name in names]


def iter_beir(model: SentenceTransformer, sets: list[RetrievalData], **kwargs) -> Iterator[tuple[str, dict]]:
    """(name, metrics) of each set in turn, zero-shot, so a caller keeps what finished when a later set fails;
    a failure names its set."""
    for data in sets:
        logger.info("BEIR %s: evaluating", data.name)
        try:
            metrics = evaluate_model(model, data, **kwargs).metrics
        except ProdStError as e:
            raise ProdStError(f"BEIR set {data.name!r}: {e}") from None
        yield data.name, metrics


def beir_average(results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """`results` with their mean under "average"."""
    return results | {"average": {k: sum(m[k] for m in results.values()) / len(results) for k in METRICS}}


def evaluate_beir(
    model: SentenceTransformer, datasets_: list[str], *, split: str = "test", **kwargs
) -> dict[str, dict[str, float]]:
    """Zero-shot evaluation on each BEIR set (see `load_beir_sets`), and their average under "average"."""
    require_positive(**{k: kwargs[k] for k in ("top_k", "batch_size", "relevance_level", "max_queries") if k in kwargs})
    return beir_average(dict(iter_beir(model, load_beir_sets(datasets_, split), **kwargs)))
