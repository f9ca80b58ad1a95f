"""Metrics against values computed by hand from their definitions, and search on a toy corpus."""

from __future__ import annotations

import math

import pytest

from prod_st.data import load_retrieval_data
from prod_st.retrieval.evaluation import compute_metrics, evaluate_model
from prod_st.util.errors import ProdStError
from prod_st.util.models import load_model

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
    half = evaluate_model(model, data, index_factory="SQfp16", keep_run=True, progress=False)  # float16 vectors
    assert {q: max(d, key=d.get) for q, d in half.run.items()} == {q: max(d, key=d.get) for q, d in exact.run.items()}
    assert half.metrics == pytest.approx(exact.metrics, abs=1e-3)
    stored = evaluate_model(model, data, dtype="float16", keep_run=True, progress=False)  # float16 on disk too
    assert {q: list(d) for q, d in stored.run.items()} == {q: list(d) for q, d in exact.run.items()}
    assert stored.metrics == pytest.approx(exact.metrics, abs=1e-3)
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


# ---- values no caller should pass, and indexes the corpus cannot train ----

@pytest.mark.parametrize("option", [{"top_k": 0}, {"batch_size": 0}, {"relevance_level": 0}, {"max_queries": 0},
                                    {"max_queries": -1}, {"top_k": 2.5}, {"batch_size": True}])
def test_counts_below_one_are_refused_before_any_work(toy_beir, option, monkeypatch):
    from prod_st.retrieval import evaluation

    monkeypatch.setattr(evaluation, "build_index", lambda *a, **k: pytest.fail("encoded before checking"))
    name, value = next(iter(option.items()))
    with pytest.raises(ProdStError, match=rf"^{name} must be an integer of at least 1, got {value!r}$"):
        evaluate_model(None, load_retrieval_data(toy_beir), progress=False, **option)


def test_relevance_level_below_one_is_refused_by_compute_metrics():
    with pytest.raises(ProdStError, match="relevance_level must be an integer of at least 1, got 0"):
        compute_metrics(QRELS, RUN, relevance_level=0)


def test_max_queries_keeps_the_first_n(toy_beir, tiny_model_dir):
    result = evaluate_model(load_model(tiny_model_dir), load_retrieval_data(toy_beir), max_queries=3, keep_run=True,
                            progress=False)
    assert result.num_queries == 3 and list(result.run) == ["q1", "q2", "q3"]


def test_ivf_index_too_big_for_the_corpus_is_refused_before_encoding(toy_beir, tiny_model_dir):
    model = load_model(tiny_model_dir)
    encoded = []
    model.encode = lambda *a, **k: encoded.append(1)  # noqa: ARG005 - must not be reached
    with pytest.raises(ProdStError, match=r"'IVF4096,Flat' needs at least 4096 vectors .* trains on 6 \(the corpus "
                                          r"has 6 documents\)"):
        evaluate_model(model, load_retrieval_data(toy_beir), index_factory="IVF4096,Flat", progress=False)
    assert encoded == []


def test_faiss_training_failure_is_one_line(toy_beir, tiny_model_dir):
    """PQ needs 256 training vectors per codebook: faiss's own refusal becomes one line."""
    with pytest.raises(ProdStError) as error:
        evaluate_model(load_model(tiny_model_dir), load_retrieval_data(toy_beir), index_factory="IVF2,PQ4",
                       progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith("faiss cannot train index 'IVF2,PQ4' on 6 vectors (")
    assert "Number of training points (6)" in message and "/project/" not in message


# ---- BEIR: sets loaded first, evaluated one by one ----

def test_beir_sets_are_all_loaded_before_any_evaluation(toy_beir, tmp_path):
    from prod_st.retrieval.evaluation import evaluate_beir, load_beir_sets

    with pytest.raises(ProdStError, match="no BEIR set given"):
        load_beir_sets([])
    with pytest.raises(ProdStError, match="given twice"):
        load_beir_sets([str(toy_beir), str(toy_beir)])
    with pytest.raises(ProdStError, match="does not exist"):  # before the model is used at all
        evaluate_beir(None, [str(toy_beir), str(tmp_path / "missing")])


def test_iter_beir_yields_each_set_before_a_later_one_fails(toy_beir, tmp_path, tiny_model_dir):
    from conftest import TOY_CORPUS, TOY_QUERIES, write_beir

    from prod_st.retrieval.evaluation import iter_beir, load_beir_sets

    small = write_beir(tmp_path / "small", dict(list(TOY_CORPUS.items())[:3]), TOY_QUERIES, {"q1": {"d1": 1}})
    sets = load_beir_sets([str(toy_beir), str(small)])
    finished = []
    with pytest.raises(ProdStError, match=rf"^BEIR set '{small}': faiss index 'IVF4,Flat' needs at least 4"):
        for name, metrics in iter_beir(load_model(tiny_model_dir), sets, index_factory="IVF4,Flat", progress=False):
            finished.append((name, metrics))
    assert [name for name, _ in finished] == [str(toy_beir)] and "nDCG@10" in finished[0][1]
