"""Hard-negative mining: rank windows, strategies, positives dropped, and the per-model run cache."""

from __future__ import annotations

import pytest

import prod_st.retrieval.mining as mining
from prod_st.data import load_retrieval_data
from prod_st.retrieval.mining import NegativeWindow, mine_negatives, pick_negatives
from prod_st.util.models import load_model

RANKED = {"q1": ["d5", "d1", "d2", "d3", "d4", "d6"], "q2": ["d2", "d3"]}
QRELS = {"q1": {"d1": 1, "d6": 0}, "q2": {"d2": 2}}


def test_hardest_first_keeps_rank_order_and_drops_positives():
    got = pick_negatives(RANKED, QRELS, NegativeWindow(1, 100, 3, "hardest"))
    assert got == {"q1": ["d5", "d2", "d3"], "q2": ["d3"]}  # q2 has only one non-positive candidate


def test_window_counts_ranks_over_the_retrieved_list():
    # ranks 3..6 of q1 are d2 d3 d4 d6; grade 0 (d6) is a negative, not a positive
    got = pick_negatives(RANKED, QRELS, NegativeWindow(3, 6, 10, "hardest"))
    assert got["q1"] == ["d2", "d3", "d4", "d6"]


def test_sampling_is_seeded_per_query_and_stays_in_the_window():
    window = NegativeWindow(1, 6, 2, "sample")
    draws = {tuple(pick_negatives(RANKED, QRELS, window, seed=s)["q1"]) for s in range(20)}
    assert len(draws) > 1  # really sampled
    assert all(set(d) <= {"d5", "d2", "d3", "d4", "d6"} and len(d) == 2 for d in draws)
    assert pick_negatives(RANKED, QRELS, window, seed=3) == pick_negatives(RANKED, QRELS, window, seed=3)


@pytest.mark.parametrize("args", [(0, 5, 1), (5, 4, 1), (1, 5, 0)])
def test_bad_window(args):
    with pytest.raises(ValueError):
        NegativeWindow(*args)


def test_mining_caches_the_run_per_model(toy_beir, tiny_model_dir, monkeypatch):
    data = load_retrieval_data(toy_beir)
    model = load_model(tiny_model_dir)
    calls = []
    real = mining.build_index
    monkeypatch.setattr(mining, "build_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    window = NegativeWindow(1, 6, 2, "hardest")
    first = mine_negatives(model, data, window, progress=False)
    assert calls == [1]
    assert set(first) == set(data.qrels)
    for qid, negs in first.items():
        assert len(negs) == 2 and not set(negs) & set(data.qrels[qid])
    assert mine_negatives(model, data, window, progress=False) == first
    assert calls == [1]  # same model, same data: no second encoding
    with __import__("torch").no_grad():
        next(model.parameters()).add_(0.01)  # another checkpoint -> another key
    mine_negatives(model, data, window, progress=False)
    assert calls == [1, 1]


def test_every_epoch_draws_afresh_from_the_same_pool():
    pools = mining.negative_pools(RANKED, QRELS, NegativeWindow(1, 6, 1, "sample"))
    assert pools == {"q1": ["d5", "d2", "d3", "d4", "d6"], "q2": ["d3"]}
    window = NegativeWindow(1, 6, 1, "sample")
    draws = [mining.draw_negatives(pools, window, seed=7, epoch=e)["q1"] for e in range(12)]
    assert len({tuple(d) for d in draws}) > 1  # count 1 is not one fixed negative for the whole stage
    assert draws[3] == mining.draw_negatives(pools, window, seed=7, epoch=3)["q1"]  # seeded
    hardest = NegativeWindow(1, 6, 2, "hardest")
    assert {tuple(mining.draw_negatives(pools, hardest, epoch=e)["q1"]) for e in range(5)} == {("d5", "d2")}


def test_pool_sizes_from_the_run_arrays_match_the_pools():
    """Issue 18 item 6: mining's count of short pools reads the RankedRun's arrays; each size is the length of
    the pool the query's list gives, for windows that start past rank 1 and run past the retrieved ranks."""
    import numpy as np
    from test_dpd import _random_run

    run, lists, qrels = _random_run(5)
    for window in (NegativeWindow(1, 20, 15), NegativeWindow(3, 12, 5), NegativeWindow(8, 40, 9)):
        sizes = mining.negative_pools(run, qrels, window).sizes()
        assert sizes.tolist() == [len(p) for p in mining.negative_pools(lists, qrels, window).values()]
        assert np.array_equal(sizes, mining.negative_pools(lists, qrels, window).sizes())
    assert len(set(sizes.tolist())) > 3


def test_doc_ids_find_marks_unknown_ids():
    import datasets

    from prod_st.data.doc_ids import DocIds

    ids = DocIds(datasets.Dataset.from_dict({"_id": ["a", "b", "c"]}))
    assert ids.find(["c", "zz", "a", "b"]).tolist() == [2, -1, 0, 1]
    assert ids.rows(["b", "a"]).tolist() == [1, 0]
    with pytest.raises(KeyError, match="zz"):
        ids.rows(["a", "zz"])
