"""Memory of the per-document and per-query structures that issue 9 removed, before vs after, in one process.

    python bench/ids_memory.py [--docs 1000000] [--queries 20000] [--depth 200]

1. doc id <-> row: a `{doc id: row}` dict plus the list of ids (what `RunData` and `corpus_index` held before)
   vs `prod_st.data.doc_ids.DocIds` (one Arrow string array + sorted hashes).
2. a ranked run (mining, DPD): `{query id: [doc id, ...]}` as read back from the JSON cache before vs a
   `prod_st.retrieval.mining.RankedRun` (a (queries, depth) int32 array of rows).
3. a stage's training rows (--queries rows, a positive and 15 negatives each, drawn from --docs documents of
   --doc-chars characters): lists of document texts before vs `TrainingRows`' int64 corpus rows (the query
   ids and texts, the same both ways, are not counted).
Bytes are Python's (tracemalloc, numpy included) plus Arrow's (`pyarrow.total_allocated_bytes`), per item, and
extrapolated to MS MARCO passage (8.8M passages; 500k training queries x the depth).
"""

from __future__ import annotations

import argparse
import gc
import json
import tracemalloc

import datasets
import numpy as np
import pyarrow as pa

MSMARCO_DOCS, MSMARCO_QUERIES = 8_841_823, 502_939


def held(build):
    """(object, bytes it holds): Python heap (tracemalloc) + Arrow's pool, measured around `build()`."""
    gc.collect()
    tracemalloc.start()
    arrow = pa.total_allocated_bytes()
    obj = build()
    gc.collect()
    python, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return obj, python + pa.total_allocated_bytes() - arrow


def main() -> None:
    from prod_st.data.doc_ids import DocIds
    from prod_st.retrieval.mining import RankedRun

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--doc-chars", type=int, default=330, help="MS MARCO passages average ~330 characters")
    args = parser.parse_args()

    corpus = datasets.Dataset.from_dict({"_id": [str(7_000_000 + i) for i in range(args.docs)],
                                         "title": [""] * args.docs, "text": [""] * args.docs})
    rng = np.random.default_rng(0)
    rows = rng.integers(0, args.docs, size=(args.queries, args.depth), dtype=np.int32)
    qids = [f"q{i}" for i in range(args.queries)]

    def old_ids():
        ids = list(corpus["_id"])
        return ids, {doc_id: i for i, doc_id in enumerate(ids)}

    (ids, _), before_ids = held(old_ids)
    new, after_ids = held(lambda: DocIds(corpus))
    text = json.dumps({q: [ids[r] for r in row] for q, row in zip(qids, rows.tolist())})
    _, before_run = held(lambda: json.loads(text))
    _, after_run = held(lambda: RankedRun(qids, rows.copy(), new))

    picked = rng.integers(0, args.docs, size=(args.queries, 16))
    filler = "x" * (args.doc_chars - 8)

    def text_rows():  # build_rows before: each distinct document's text once, referenced from the rows' lists
        text_of = {int(d): f"{d:08d}{filler}" for d in np.unique(picked)}
        return [text_of[r[0]] for r in picked.tolist()], [[text_of[d] for d in r[1:]] for r in picked.tolist()]

    _, before_rows = held(text_rows)
    _, after_rows = held(lambda: (picked[:, 0].astype(np.int64), picked[:, 1:].astype(np.int64)))
    per_row = (before_rows / args.queries, after_rows / args.queries)
    per_doc = (before_ids / args.docs, after_ids / args.docs)
    per_rank = (before_run / rows.size, after_run / rows.size)
    report = {
        "docs": args.docs, "queries": args.queries, "depth": args.depth,
        "doc_ids_bytes_per_doc": {"before": round(per_doc[0], 1), "after": round(per_doc[1], 1)},
        "ranked_bytes_per_rank": {"before": round(per_rank[0], 1), "after": round(per_rank[1], 1)},
        "training_row_bytes": {"before": round(per_row[0], 1), "after": round(per_row[1], 1),
                               "distinct_docs": int(len(np.unique(picked)))},
        "msmarco_GB": {
            "doc_ids": {k: round(v * MSMARCO_DOCS / 1e9, 2) for k, v in zip(("before", "after"), per_doc)},
            f"ranked_run_{args.depth}": {k: round(v * MSMARCO_QUERIES * args.depth / 1e9, 2)
                                         for k, v in zip(("before", "after"), per_rank)},
            "training_rows_one_epoch": {k: round(v * MSMARCO_QUERIES / 1e9, 2) for k, v in zip(("before", "after"), per_row)},
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
