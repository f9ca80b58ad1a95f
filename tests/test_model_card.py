"""RetrievalEvaluator (prod-st's evaluation as a sentence-transformers evaluator: in the trainer's logs and the
card data) and the report without matplotlib. The card of a whole run is checked in test_runner's end-to-end
test, its publication in test_publish."""

from __future__ import annotations

import json
import sys

import pytest

from prod_st.data import load_retrieval_data
from prod_st.retrieval.evaluation import evaluate_model
from prod_st.retrieval.retrieval_evaluator import RetrievalEvaluator
from prod_st.util.errors import ProdStError
from prod_st.util.models import load_model


def test_evaluator_gives_evaluate_models_metrics_and_records_them(tiny_model_dir, toy_beir):
    data = load_retrieval_data(toy_beir)
    model = load_model(tiny_model_dir)
    expected = evaluate_model(model, data, top_k=5, progress=False).metrics
    evaluator = RetrievalEvaluator(data, top_k=5, metric="MRR@10")
    metrics = evaluator(model)
    assert evaluator.name == "toy-test" and evaluator.primary_metric == "toy-test_MRR@10"
    assert metrics == {f"toy-test_{k}": pytest.approx(v) for k, v in expected.items()}
    assert evaluator.last_result.run and set(evaluator.last_result.run) == set(data.split_queries())
    assert model.model_card_data.eval_results_dict[evaluator] == metrics  # what the card's model-index reads
    assert model.model_card_data.training_logs[-1]["toy-test_MRR@10"] == pytest.approx(expected["MRR@10"])
    assert evaluator.description == "Retrieval" and evaluator.get_config_dict()["top_k"] == 5


def test_evaluator_without_data_only_describes(tiny_model_dir):
    evaluator = RetrievalEvaluator(name="msmarco-test")
    with pytest.raises(ProdStError, match="no data"):
        evaluator(load_model(tiny_model_dir))
    with pytest.raises(ProdStError, match="needs its data"):
        RetrievalEvaluator()


def test_the_trainer_logs_dev_metrics_through_the_evaluator(tmp_path, tiny_model_dir, toy_beir):
    """Given to SentenceTransformerTrainer with an eval_strategy, the evaluator runs during training and its
    metrics reach the trainer's log history and the model's card data (training logs)."""
    import datasets
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    from prod_st.training.losses import contrastive_loss

    model = load_model(tiny_model_dir)
    rows = datasets.Dataset.from_dict({"query": [f"q{i}" for i in range(8)], "positive": [f"p{i}" for i in range(8)]})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, eval_strategy="steps",
                                                eval_steps=1, per_device_train_batch_size=4, report_to="none",
                                                save_strategy="no")
    evaluator = RetrievalEvaluator(load_retrieval_data(toy_beir), top_k=5)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=rows, loss=contrastive_loss(model),
                                         evaluator=evaluator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_toy-test_nDCG@10" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]
    assert [row["Step"] for row in model.model_card_data.training_logs if "toy-test_nDCG@10" in row] == [1, 2]


def test_report_without_matplotlib_is_its_tables(tmp_path, monkeypatch):
    """matplotlib is the `plot` extra: without it report.md is written (no image link) and no report.png."""
    from prod_st.run.report import write_report

    run = tmp_path / "run"
    (run / "00-init").mkdir(parents=True)
    record = {"index": 0, "name": "init", "kind": "init", "student_dev": {"nDCG@10": 0.25}, "seconds": {"eval": 1.0}}
    (run / "00-init" / "metrics.json").write_text(json.dumps(record))
    (run / "00-init" / "DONE").write_text("")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report = write_report(run).read_text()
    assert "| 0 | init |  | 0.2500 |" in report and "report.png" not in report
    assert not (run / "report.png").exists()
    monkeypatch.undo()  # matplotlib as it was (a fresh import would clash with its cached submodules)
    assert "![metric per stage](report.png)" in write_report(run).read_text() and (run / "report.png").is_file()
