"""Doc ids <-> corpus rows without a Python object per document (`prod_st.data.doc_ids`), and retrieval runs held
as arrays of rows (`prod_st.retrieval.mining.RankedRun`)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from prod_st.data import doc_ids as doc_ids_module
from prod_st.data.doc_ids import DocIds
from prod_st.retrieval.mining import RankedRun


def corpus(ids: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"_id": ids, "title": [""] * len(ids), "text": [f"text of {i}" for i in ids]})


def test_rows_and_ids_round_trip_in_a_selected_view(monkeypatch):
    monkeypatch.setattr(doc_ids_module, "BATCH", 7)  # several batches
    whole = corpus([f"doc-{i}" for i in range(50)])
    view = whole.select([49, 3, 10, 11, 0, 25])  # a seeded subset, as load_run_data makes: rows of the view
    ids = DocIds(view)
    assert len(ids) == 6 and ids[0] == "doc-49" and ids.take([2, 0]) == ["doc-10", "doc-49"]
    assert ids.rows(["doc-0", "doc-49", "doc-25"]).tolist() == [4, 0, 5]
    assert view.select(ids.rows(["doc-11"]))["text"] == ["text of doc-11"]
    assert ids.take([]) == [] and ids.rows([]).tolist() == []
    with pytest.raises(KeyError, match="doc-7"):  # in the whole corpus, not in the view
        ids.rows(["doc-3", "doc-7"])


def test_colliding_hashes_fall_back_to_an_exact_lookup(monkeypatch):
    monkeypatch.setattr(doc_ids_module, "hash", lambda s: 1, raising=False)  # every id collides
    ids = DocIds(corpus(["a", "b", "c"]))
    assert ids.rows(["c", "a", "b"]).tolist() == [2, 0, 1]
    assert ids.find(["b", "z", "c"]).tolist() == [1, -1, 2]
    with pytest.raises(KeyError):
        ids.rows(["z"])


def test_a_collision_costs_an_exact_lookup_not_a_dict_of_every_id(monkeypatch):
    monkeypatch.setattr(doc_ids_module, "hash", lambda s: 1 if s in ("d3", "d7") else int(s[1:]) + 10, raising=False)
    ids = DocIds(corpus([f"d{i}" for i in range(10)]))
    assert ids._collided.tolist() == [1] and not any(isinstance(v, dict) for v in vars(ids).values())
    assert ids.find(["d7", "d3", "d5", "x9"]).tolist() == [7, 3, 5, -1]


def test_ranked_run_reads_ids_from_rows():
    ids = DocIds(corpus(["d0", "d1", "d2", "d3"]))
    run = RankedRun(["q1", "q2"], np.array([[3, 1, 0], [2, -1, -1]], dtype=np.int32), ids)
    assert run == {"q1": ["d3", "d1", "d0"], "q2": ["d2"]} and list(run) == ["q1", "q2"] and len(run) == 2
    with pytest.raises(ValueError, match="2 queries but 1 rows"):
        RankedRun(["q1", "q2"], np.zeros((1, 3), np.int32), ids)


def _held_bytes(build):
    """(object, bytes it holds): Python heap (tracemalloc; numpy's buffers included) + Arrow's memory pool,
    measured around `build()` (what bench/ids_memory.py measured, before it was removed)."""
    import gc
    import tracemalloc

    import pyarrow as pa

    gc.collect()
    tracemalloc.start()
    try:
        arrow = pa.total_allocated_bytes()
        obj = build()
        gc.collect()
        python, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return obj, python + pa.total_allocated_bytes() - arrow


def test_ids_and_ranked_runs_hold_arrays_not_a_python_object_per_item():
    """Issue 9: doc ids are one Arrow string array + sorted hashes (27 B a document measured, where a dict and a
    list of str took 123 B), and a ranked run is an int32 array of rows (4.2 B a rank, not 65 B of lists of
    new str). At MS MARCO's 8.8M documents and 500k x 200 ranks that is 0.24 GB instead of 1.09 GB, 0.43 GB
    instead of 6.5 GB."""
    n, queries, depth = 100_000, 2_000, 100
    big = datasets.Dataset.from_dict({"_id": [str(7_000_000 + i) for i in range(n)]})
    ids, held = _held_bytes(lambda: DocIds(big))
    assert held / n < 48, f"{held / n:.1f} bytes per document id"  # a dict + list of str: > 100
    rows = np.random.default_rng(0).integers(0, n, size=(queries, depth), dtype=np.int32)
    qids = [f"q{i}" for i in range(queries)]
    run, held = _held_bytes(lambda: RankedRun(qids, rows.copy(), ids))
    assert held / rows.size < 8, f"{held / rows.size:.1f} bytes per rank"  # lists of str ids: > 60
    assert run[qids[7]] == ids.take(rows[7])
