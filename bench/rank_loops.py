"""Per-query loops every rank ran (issue 18 item 6), before and after, on synthetic data of a chosen size:
DPD's student ranks (which queries the teacher is asked about), mining's count of short pools, and
`split_queries()`. "before" is the per-query path (a list of doc ids made for every query, one Python pass over
the queries file), "after" the array path the runner now takes; both give the same answer (checked here).

    python bench/rank_loops.py [--queries 100000] [--depth 100] [--docs 200000]

Prints one JSON object: seconds and peak traced Python allocations (tracemalloc) of each, before and after.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Mapping

import datasets
import numpy as np

from prod_st.data import RetrievalData
from prod_st.data.doc_ids import DocIds
from prod_st.retrieval.mining import NegativeWindow, RankedRun, negative_pools
from prod_st.training.dpd import decided_by_student


class Lists(Mapping):
    """The run as a plain mapping of id lists (what the code iterated before): hides the arrays."""

    def __init__(self, run: RankedRun) -> None:
        self.run = run

    def __getitem__(self, qid):
        return self.run[qid]

    def __iter__(self):
        return iter(self.run)

    def __len__(self):
        return len(self.run)


def measure(what, fn) -> tuple[object, dict]:
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, {"s": round(seconds, 2), "peak_mb": round(peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--docs", type=int, default=200_000)
    a = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = [f"D{i}" for i in range(a.docs)]
    corpus = datasets.Dataset.from_dict({"_id": ids})
    rows = rng.integers(0, a.docs, (a.queries, a.depth), dtype=np.int32)
    qids = [f"Q{i}" for i in range(a.queries)]
    run = RankedRun(qids, rows, DocIds(corpus))
    qrels = {q: {ids[rows[i, rng.integers(0, a.depth)]] if i % 3 else ids[rng.integers(0, a.docs)]: 1}
             for i, q in enumerate(qids)}
    rule = {"student_min": 2, "student_max": 15, "variant": "msmarco"}
    report = {"queries": a.queries, "depth": a.depth, "docs": a.docs}

    before, report["dpd_before"] = measure("dpd", lambda: decided_by_student(Lists(run), qrels, **rule))
    after, report["dpd_after"] = measure("dpd", lambda: decided_by_student(run, qrels, **rule))
    assert before == after

    window = NegativeWindow(1, a.depth, 15)
    before, report["pools_before"] = measure("pools", lambda: int(sum(
        len(p) < window.count for p in negative_pools(Lists(run), qrels, window).values())))
    after, report["pools_after"] = measure("pools", lambda: int(
        (negative_pools(run, qrels, window).sizes() < window.count).sum()))
    assert before == after

    queries = datasets.Dataset.from_dict({"_id": qids[::-1] + [f"X{i}" for i in range(a.queries // 2)],
                                          "text": [f"text of {q}" for q in qids[::-1]] + ["x"] * (a.queries // 2)})
    data = RetrievalData("synthetic", "train", corpus, queries, qrels)

    def old_split_queries():
        texts = {q: t for q, t in zip(data.queries["_id"], data.queries["text"]) if q in qrels}
        return {q: texts[q] for q in qrels}

    before, report["split_queries_before"] = measure("split", old_split_queries)
    after, report["split_queries_after"] = measure("split", data.split_queries)
    _, report["split_queries_again"] = measure("split", data.split_queries)
    assert before == after
    print(json.dumps(report))


if __name__ == "__main__":
    main()
