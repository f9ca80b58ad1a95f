"""Metrics against values computed by hand from their definitions, and search on a toy corpus."""

from __future__ import annotations

import math

import pytest

from prod_st.data import load_retrieval_data
from prod_st.errors import ProdStError
from prod_st.evaluation import compute_metrics, evaluate_model
from prod_st.models import load_model

# q1: relevant d1 (grade 1) and d3 (grade 2); the run ranks d2, d1, d4, d3.
# q2: relevant d9; the run ranks it 12th (outside the top 10).
QRELS = {"q1": {"d1": 1, "d3": 2, "d2": 0}, "q2": {"d9": 1}}
RUN = {
    "q1": {"d2": 0.9, "d1": 0.8, "d4": 0.7, "d3": 0.6},
    "q2": {f"x{i}": 1.0 - i / 100 for i in range(11)} | {"d9": 0.5},
}


def test_metrics_match_hand_computation():
    m = compute_metrics(QRELS, RUN)
    # nDCG@10 with trec_eval's linear gains (gain = grade, as in BEIR): q1 DCG = 1/log2(3) + 2/log2(5),
    # ideal DCG = 2/log2(2) + 1/log2(3). q2: 0.
    ndcg_q1 = (1 / math.log2(3) + 2 / math.log2(5)) / (2 + 1 / math.log2(3))
    assert m["nDCG@10"] == pytest.approx(ndcg_q1 / 2)
    # MRR@10: q1 first relevant at rank 2 -> 1/2; q2 at rank 12 -> cut to 0.
    assert m["MRR@10"] == pytest.approx(0.25)
    # Recall@10: q1 2/2, q2 0/1; Recall@50: both found.
    assert m["R@10"] == pytest.approx(0.5)
    assert m["R@50"] == pytest.approx(1.0) and m["R@1000"] == pytest.approx(1.0)
    # MAP: q1 precision at the relevant ranks 2 and 4 = (1/2 + 2/4) / 2; q2 = 1/12.
    assert m["MAP@1000"] == pytest.approx(((0.5 + 0.5) / 2 + 1 / 12) / 2)


def test_relevance_level_makes_grade_one_non_relevant():
    m = compute_metrics({"q1": QRELS["q1"]}, {"q1": RUN["q1"]}, relevance_level=2)
    assert m["MRR@10"] == pytest.approx(1 / 4)  # only d3 (grade 2) counts, at rank 4
    assert m["R@10"] == pytest.approx(1.0)


def test_query_missing_from_run_counts_as_zero():
    m = compute_metrics(QRELS, {"q1": RUN["q1"]})
    assert m["MRR@10"] == pytest.approx(0.25)  # (1/2 + 0) / 2, not 1/2


def test_empty_qrels_is_an_error():
    with pytest.raises(ProdStError, match="no judged queries"):
        compute_metrics({}, RUN)


def test_packaged_model_retrieves_the_right_sense(toy_beir):
    data = load_retrieval_data(toy_beir)
    result = evaluate_model(load_model("all-MiniLM-L6-v2"), data, top_k=3, keep_run=True, progress=False)
    assert result.num_queries == 4 and result.num_docs == 6
    assert all(len(docs) == 3 for docs in result.run.values())
    top1 = {q: max(docs, key=docs.get) for q, docs in result.run.items()}
    assert top1["q3"] == "d3" and top1["q4"] == "d5"  # unambiguous queries
    assert 0.5 <= result.metrics["MRR@10"] <= 1.0


def test_approximate_index_and_bad_factory(toy_beir, tiny_model_dir):
    data = load_retrieval_data(toy_beir)
    model = load_model(tiny_model_dir)
    exact = evaluate_model(model, data, keep_run=True, progress=False)
    hnsw = evaluate_model(model, data, index_factory="HNSW8", keep_run=True, progress=False)
    assert hnsw.metrics == pytest.approx(exact.metrics)  # 6 docs: HNSW is exact here
    with pytest.raises(ProdStError, match="invalid faiss index factory"):
        evaluate_model(model, data, index_factory="NoSuchIndex", progress=False)


def test_question_answering_split_reports_answer_accuracy():
    """DPR NQ test: answers, no qrels -> Acc@5/20/100 (answer string in a retrieved passage), as the paper."""
    from conftest import FIXTURES

    data = load_retrieval_data(FIXTURES / "dpr-nq", "test")
    assert data.qrels == {} and data.answers
    result = evaluate_model(load_model("all-MiniLM-L6-v2"), data, top_k=100, keep_run=True, progress=False)
    assert set(result.metrics) == {"Acc@5", "Acc@20", "Acc@100"}
    # the fixture corpus is tiny: every answer-bearing passage is within the top 100
    assert result.metrics["Acc@100"] == pytest.approx(1.0)
    assert result.metrics["Acc@5"] <= result.metrics["Acc@20"] <= result.metrics["Acc@100"]
