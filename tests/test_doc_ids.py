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
