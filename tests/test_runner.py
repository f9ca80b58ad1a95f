"""`prod-st run` end to end on a tiny recipe (tiny models, a slice of wordnet-gloss), resume after a kill,
and the run command's bad-input cases."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from prod_st_cli.main import main

import prod_st.retrieval.corpus_index as corpus_index
import prod_st.run.final as final_module
import prod_st.teachers.strength as teacher_strength
import prod_st.training.student_training as train_student_module
from prod_st.recipe import load_recipe
from prod_st.runner import Runner
from prod_st.training.stage_data import read_rows


def tiny_recipe(model: str) -> dict:
    negatives = {"miner": "student", "start": 1, "end": 20, "count": 2, "strategy": "sample"}
    return {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "wordnet-gloss", "train_queries": 24, "dev_queries": 8, "test_queries": 8, "corpus_size": 150},
        "student": {"init": model, "num_layers": 1, "max_query_length": 16, "max_doc_length": 32},
        "teachers": {
            "bi": {"kind": "bi-encoder", "train": {"backbone": model, "max_steps": 2, "batch_size": 8, "num_negatives": 1}},
            "ce": {"kind": "cross-encoder", "train": {"backbone": model, "max_steps": 2, "batch_size": 4,
                                                      "num_negatives": 2, "negatives_from": "bi", "max_length": 48},
                   "max_length": 48},
        },
        "stages": [
            {"name": "warmup", "kind": "warmup", "candidates": "in_batch", "negatives": negatives | {"count": 1},
             "max_steps": 6, "batch_size": 8},  # 48 rows read of ~24 queries: negatives drawn for 2+ epochs
            {"name": "bi", "teacher": "bi", "candidates": "in_batch", "negatives": negatives | {"count": 1},
             "max_steps": 2, "batch_size": 8},
            {"name": "ce", "teacher": "ce", "candidates": "list", "negatives": negatives,
             "loss": {"reg_weight": 1.0}, "max_steps": 3, "batch_size": 4},
        ],
        "dpd": {"teacher": "ce", "rerank_depth": 15, "num_negatives": 2, "max_steps": 2, "batch_size": 4},
        "eval": {"top_k": 100, "teacher_rerank_depth": 5},
    }


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path, tiny_model_dir, toy_beir) -> Path:
    recipe = tiny_recipe(tiny_model_dir)
    recipe["eval"]["beir"] = [str(toy_beir)]  # a local BEIR folder, zero-shot at the end of the run
    recipe["publish"] = {"repo_id": "me/tiny-prod", "dry_run": True}  # the upload folder, no network
    return write(tmp_path / "tiny.yaml", recipe)


def test_tiny_recipe_end_to_end_then_rerun_does_nothing(recipe_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    stages = ["00-init", "01-warmup", "02-bi", "03-ce", "04-dpd-1"]
    encoded = Counter()  # documents encoded per (checkpoint, corpus) key
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path / "cache"))  # what other tests cached is not counted
    monkeypatch.setattr(corpus_index, "encoded_docs", encoded)
    corpus_index._last_index.clear()
    runner = Runner(load_recipe(recipe_file), run_dir)
    final = runner.run()

    # Each checkpoint encodes the corpus once, however many steps search it: dev evaluation, the next stage's
    # mining, DPD's retrieval and the test. The checkpoints: every distinct student (a DPD round that keeps no
    # query leaves its student as it was), the backbone that mines for bi, the bi teacher that mines for ce and
    # is tested; and the final student once more on the BEIR folder.
    toy_docs = len(__import__("prod_st.data", fromlist=["x"]).load_retrieval_data(str(tmp_path / "toy")).corpus)
    students = {(run_dir / name / "student" / "model.safetensors").read_bytes() for name in stages}
    assert len(students) >= 4
    assert sorted(encoded.values()) == [toy_docs] + [final["num_docs"]] * (len(students) + 2), encoded
    # ... and a stage's starting student's encoding is dropped once the stage is done (the untrained student's
    # and the last one's stay: the test searches with them)
    kept = {name: corpus_index.cache_path("corpus", corpus_index.cache_key(runner.load_student(run_dir / name),
                                                                          runner.data.corpus)).exists()
            for name in stages}
    assert kept["00-init"] and kept["04-dpd-1"] and not kept["01-warmup"] and not kept["02-bi"], kept

    assert sorted(p.name for p in run_dir.iterdir() if p.name[:2].isdigit()) == stages
    for name in stages:
        assert (run_dir / name / "DONE").exists() and (run_dir / name / "student" / "modules.json").exists()
    assert (run_dir / "recipe.yaml").read_text() == load_recipe(recipe_file).resolved_yaml()
    ce = json.loads((run_dir / "03-ce" / "metrics.json").read_text())
    assert ce["teacher"] == "ce" and ce["teacher_measured_as"].startswith("reranker")
    assert set(ce["gap_after"]) == {"kl", "kendall_tau", "top1_agreement"}
    assert ce["train"]["steps"] == 3
    labels = read_rows(run_dir / "03-ce" / "train_data")["label"]
    # per row: the teacher's and the stage-start student's scores over positive + 2 negatives
    assert all(len(row) == 2 and len(row[0]) == len(row[1]) == 3 for row in labels)
    assert ce["teacher_rerank_dev"]["nDCG@10"] == ce["teacher_dev"]["nDCG@10"]  # a ce is measured as a reranker
    check_training_data(run_dir)
    dpd = json.loads((run_dir / "04-dpd-1" / "metrics.json").read_text())
    assert sum(dpd["selection"].values()) == 24  # every training query counted once
    assert final["num_test_queries"] == 8
    assert set(final["test"]["teachers"]) == {"bi", "ce"}
    assert set(final["beir"]) == {str(tmp_path / "toy"), "average"}
    assert 0.0 <= final["test"]["student"]["nDCG@10"] <= 1.0
    student = __import__("sentence_transformers").SentenceTransformer(str(run_dir / "student"))
    assert student.encode(["a query"]).shape == (1, 32)
    card = (run_dir / "hub-upload" / "README.md").read_text()
    assert "## PROD: progressive distillation" in card and 'SentenceTransformer("me/tiny-prod")' in card
    # the card the trainer built, stage by stage: training data with sizes, losses and their citations, logs
    assert card == (run_dir / "student" / "README.md").read_text().replace("sentence_transformers_model_id",
                                                                           "me/tiny-prod")
    front = card.split("---")[1]
    assert "- loss:PRODLoss" in front and "- loss:MultipleNegativesRankingLoss" in front and "dataset_size:" in front
    assert "model-index:" in front and "type: nDCG@10" in front and "name: wordnet gloss test" in front
    for stage in ("warmup", "bi", "ce"):  # (dpd-1 kept no query here: it trained nothing)
        assert f"#### wordnet-gloss: {stage}" in card and f"- wordnet-gloss: {stage}" in card
    assert "Training Dataset:** Unknown" not in card and "Unnamed Dataset" not in card
    assert card.count("\n## Usage") == 1 and card.count("\n## Citation") == 1 and card.count("```bibtex") == 3
    assert "#### PRODLoss" in card and "@inproceedings{lin2023prod," in card  # PRODLoss's own citation
    assert "### Training Logs" in card and "| Training Loss | Stage " in card
    assert "| wordnet-gloss-dev_nDCG@10 |" in card  # the dev evaluator's metric, stage by stage in the logs
    assert "* Datasets: `wordnet-gloss-dev`, `wordnet-gloss-test` and `beir-toy`" in card  # dev, test, BEIR: one table
    assert "- `ce: max_steps`: 3" in card and "- `ce: learning_rate`: 5e-05" in card  # each stage's settings
    report = (run_dir / "report.md").read_text()
    assert "| 3 | ce | ce |" in report and "## Test" in report and (run_dir / "report.png").stat().st_size > 1000

    # A rerun finds final.json and does no work at all: no model is trained or evaluated.
    import prod_st.retrieval.evaluation

    real_evaluate, real_train = final_module.evaluate_model, train_student_module.train_student
    monkeypatch.setattr(final_module, "evaluate_model", lambda *a, **k: pytest.fail("re-evaluated"))
    monkeypatch.setattr(prod_st.retrieval.evaluation, "evaluate_model", lambda *a, **k: pytest.fail("re-evaluated"))
    monkeypatch.setattr(teacher_strength, "evaluate_model", lambda *a, **k: pytest.fail("re-evaluated"))
    monkeypatch.setattr(train_student_module, "train_student", lambda *a, **k: pytest.fail("re-trained"))
    assert Runner(load_recipe(recipe_file), run_dir).run() == final

    # Killed during the final evaluation: the rerun trains nothing (no student, no teacher) and still
    # evaluates both teachers, loaded from the run folder.
    import prod_st.teachers.pool as teacher_pool

    monkeypatch.setattr(final_module, "evaluate_model", real_evaluate)
    monkeypatch.setattr(prod_st.retrieval.evaluation, "evaluate_model", real_evaluate)
    monkeypatch.setattr(teacher_strength, "evaluate_model", real_evaluate)
    for trainer in ("train_bi_encoder", "train_cross_encoder"):
        monkeypatch.setattr(teacher_pool, trainer, lambda *a, **k: pytest.fail("teacher re-trained"))
    monkeypatch.setattr(train_student_module, "train_student", lambda *a, **k: pytest.fail("re-trained"))
    (run_dir / "final.json").unlink()
    again = Runner(load_recipe(recipe_file), run_dir).run()
    assert set(again["test"]["teachers"]) == {"bi", "ce"}
    assert sum(encoded.values()) == final["num_docs"] * (len(students) + 2) + toy_docs  # the test read the cached encodings
    assert again["test"]["student"] == pytest.approx(final["test"]["student"])

    # Only eval.beir and publish change: every stage is kept, only the final steps run again.
    finished = {name: (run_dir / name / "DONE").stat().st_mtime_ns for name in stages}
    changed = yaml.safe_load(recipe_file.read_text())
    changed["eval"]["beir"] = []
    changed["publish"]["repo_id"] = "me/other-name"
    again = Runner(load_recipe(write(tmp_path / "changed.yaml", changed)), run_dir).run()
    assert again["beir"] == {} and again["test"]["student"] == pytest.approx(final["test"]["student"])
    assert "me/other-name" in (run_dir / "hub-upload" / "README.md").read_text()
    assert {name: (run_dir / name / "DONE").stat().st_mtime_ns for name in stages} == finished

    # A stage changes: it and every later step are redone, earlier ones kept; no teacher is retrained.
    changed["stages"][2]["lr"] = 1e-4
    trained = []
    monkeypatch.setattr(train_student_module, "train_student",
                        lambda *a, **k: trained.append(k["workdir"].parent.name) or real_train(*a, **k))
    Runner(load_recipe(write(tmp_path / "changed.yaml", changed)), run_dir).run()
    assert trained[0] == "03-ce" and set(trained) <= {"03-ce", "04-dpd-1"}
    assert {n: (run_dir / n / "DONE").stat().st_mtime_ns for n in stages[:3]} == {n: finished[n] for n in stages[:3]}
    assert (run_dir / "04-dpd-1" / "DONE").stat().st_mtime_ns > finished["04-dpd-1"]
    assert (run_dir / "final.json").exists()


def check_training_data(run_dir: Path) -> None:
    """What each stage trained on: fresh negatives per epoch, the in-batch labels are the bi teacher's
    embeddings, the list labels' second row is the stage-start student's scores, and distilling changed the
    student."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from prod_st.util.fingerprint import model_fingerprint

    warmup = read_rows(run_dir / "01-warmup" / "train_data")
    epochs = json.loads((run_dir / "01-warmup" / "negatives.json").read_text())["epochs"]
    assert epochs >= 2 and len(warmup) % epochs == 0
    size = len(warmup) // epochs
    first, second = warmup.select(range(size)).to_dict(), warmup.select(range(size, 2 * size)).to_dict()
    assert first["query"] == second["query"] and first["positive"] == second["positive"]
    assert first["negative_1"] != second["negative_1"]  # epoch 1 reads other negatives than epoch 0

    bi = read_rows(run_dir / "02-bi" / "train_data").select(range(4)).to_dict()
    teacher = SentenceTransformer(str(run_dir / "teachers" / "bi" / "model"))
    labels = np.asarray(bi["label"], dtype=np.float32)  # (rows, 1 + 1 + 1, dim): query, positive, negative
    q = teacher.encode_query(bi["query"], normalize_embeddings=True)
    docs = teacher.encode_document(bi["positive"] + bi["negative_1"], normalize_embeddings=True)
    np.testing.assert_allclose(labels[:, 0], 20.0 * q, rtol=1e-3, atol=1e-4)  # cosine x 20 folded into the query
    np.testing.assert_allclose(labels[:, 1], docs[:4], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(labels[:, 2], docs[4:], rtol=1e-3, atol=1e-4)

    ce = read_rows(run_dir / "03-ce" / "train_data").select(range(4)).to_dict()
    start = SentenceTransformer(str(run_dir / "02-bi" / "student"))  # the ce stage's stage-start student
    q = start.encode_query(ce["query"], convert_to_tensor=True)
    for column, name in enumerate(["positive", "negative_1", "negative_2"]):
        d = start.encode_document(ce[name], convert_to_tensor=True)
        want = 20.0 * start.similarity_pairwise(q, d).numpy()
        np.testing.assert_allclose([row[1][column] for row in ce["label"]], want, rtol=1e-3, atol=1e-3)

    def fingerprint(stage: str) -> str:
        return model_fingerprint(SentenceTransformer(str(run_dir / stage / "student")))

    assert fingerprint("01-warmup") != fingerprint("02-bi") != fingerprint("03-ce")  # distilling trains


def test_killed_run_resumes_from_the_last_finished_step(recipe_file, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_train = train_student_module.train_student
    calls = []

    def dies_in_ce(*args, **kwargs):
        calls.append(kwargs["workdir"].parent.name)
        if kwargs["workdir"].parent.name == "03-ce":
            raise KeyboardInterrupt  # the process is killed mid-stage
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_student_module, "train_student", dies_in_ce)
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(recipe_file), run_dir).run()
    assert (run_dir / "02-bi" / "DONE").exists() and not (run_dir / "03-ce" / "DONE").exists()

    monkeypatch.setattr(train_student_module, "train_student", lambda *a, **k: calls.append(k["workdir"].parent.name) or real_train(*a, **k))
    Runner(load_recipe(recipe_file), run_dir).run()
    # finished stages were not redone; the killed one ran again (DPD trains only if some query passed its rule)
    assert calls[:4] == ["01-warmup", "02-bi", "03-ce", "03-ce"] and set(calls[4:]) <= {"04-dpd-1"}
    assert (run_dir / "final.json").exists()


def test_evaluate_only_recipe_tests_another_runs_student(monkeypatch, capsys, tmp_path, tiny_model_dir, toy_beir):
    """`stages: []` with `student.init` naming a finished run folder: no train or dev split is read (the toy
    folder has test qrels only), nothing trains, the student is tested once, through `prod-st run`."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from prod_st.data import load_retrieval_data
    from prod_st.retrieval.evaluation import evaluate_model

    previous = tmp_path / "runs" / "prev"  # a finished run: its recipe and its final student
    previous.mkdir(parents=True)
    (previous / "recipe.yaml").write_text("name: prev\n")
    shutil.copytree(tiny_model_dir, previous / "student")
    recipe = {
        "name": "dl19-like",
        "data": {"dataset": str(toy_beir), "train_split": None, "dev_split": None, "test_split": "test"},
        "student": {"init": str(previous), "max_doc_length": 64},
        "stages": [],
        "eval": {"top_k": 10},
    }
    path = write(tmp_path / "eval-only.yaml", recipe)
    run_dir = tmp_path / "run"
    calls = []
    monkeypatch.setattr(final_module, "evaluate_model", lambda *a, **k: calls.append(1) or evaluate_model(*a, **k))
    monkeypatch.setattr(train_student_module, "train_student", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["prod-st", "run", str(path), "--output", str(run_dir)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0

    assert calls == [1]  # the test split, once: no dev evaluation, no second pass for "before training"
    assert sorted(p.name for p in run_dir.iterdir() if p.name[:2].isdigit()) == ["00-init"]
    assert json.loads((run_dir / "00-init" / "metrics.json").read_text())["student_dev"] == {}
    assert not (run_dir / "00-init" / "dev_run.json").exists()
    final = json.loads((run_dir / "final.json").read_text())
    expected = evaluate_model(SentenceTransformer(str(previous / "student")), load_retrieval_data(toy_beir, "test"),
                              top_k=10).metrics
    assert final["test"]["student"] == pytest.approx(expected)
    assert "student_before_training" not in final["test"] and final["test"]["teachers"] == {}
    assert final["num_test_queries"] == 4 and (run_dir / "student" / "modules.json").exists()
    assert "## Test (4 queries" in (run_dir / "report.md").read_text()
    out = capsys.readouterr().out
    assert "dl19-like: test (4 queries" in out and "before training" not in out  # one row: the student tested


def _training_setup(tmp_path, tiny_model_dir):
    import datasets
    from sentence_transformers import SentenceTransformer

    from prod_st.training.losses import contrastive_loss

    data = datasets.Dataset.from_dict({"query": [f"q{i}" for i in range(16)], "positive": [f"p{i}" for i in range(16)]})
    model = SentenceTransformer(tiny_model_dir)
    kwargs = dict(workdir=tmp_path / "ck", lr=1e-4, epochs=1.0, batch_size=2, warmup_ratio=0.0, seed=0, no_duplicates=False)

    def counted_loss():
        """The loss, and a list that grows by one per training step actually run (one forward per step)."""
        loss, calls = contrastive_loss(model), []
        loss.register_forward_pre_hook(lambda *_: calls.append(1))
        return loss, calls

    return model, data, kwargs, counted_loss


def test_checkpoint_resume_inside_a_stage(tmp_path, tiny_model_dir):
    """A stage killed after a checkpoint restarts from it, not from step 0."""
    from prod_st.training.student_training import COMPLETE, train_student

    model, data, kwargs, counted_loss = _training_setup(tmp_path, tiny_model_dir)
    loss, calls = counted_loss()
    train_student(model, data, loss, max_steps=4, **kwargs)
    assert len(calls) == 4
    # only the last checkpoint is kept, and it is marked complete
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["checkpoint-4"]
    assert (tmp_path / "ck" / "checkpoint-4" / COMPLETE).is_file()
    # same folder, longer schedule: resumes at step 4 and runs only the remaining steps
    loss, calls = counted_loss()
    result = train_student(model, data, loss, max_steps=6, checkpoints=3, **kwargs)
    assert result["steps"] == 6 and len(calls) == 2


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path, tiny_model_dir, monkeypatch):
    """Killed while the trainer saves checkpoint-4: checkpoint-2 (complete) is still on disk, the rerun resumes
    from it (4 steps to go, not 2, not 6) and removes the half-written folder."""
    from transformers import Trainer

    from prod_st.training.student_training import COMPLETE, train_student

    model, data, kwargs, counted_loss = _training_setup(tmp_path, tiny_model_dir)
    real_save_rng_state = Trainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # the model and optimizer of checkpoint-4 are written by now
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return real_save_rng_state(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_at_step_4)
    loss, _ = counted_loss()
    with pytest.raises(KeyboardInterrupt):
        train_student(model, data, loss, max_steps=6, checkpoints=3, **kwargs)  # checkpoints at steps 2, 4, 6
    ck = tmp_path / "ck"
    assert (ck / "checkpoint-2" / COMPLETE).is_file()
    assert (ck / "checkpoint-4").is_dir() and not (ck / "checkpoint-4" / COMPLETE).exists()

    monkeypatch.setattr(Trainer, "_save_rng_state", real_save_rng_state)
    loss, calls = counted_loss()
    result = train_student(model, data, loss, max_steps=6, checkpoints=3, **kwargs)
    assert result["steps"] == 6 and len(calls) == 4
    assert [p.name for p in ck.iterdir()] == ["checkpoint-6"] and (ck / "checkpoint-6" / COMPLETE).is_file()


# ---- bad input: one line, exit 2, nothing overwritten ----

def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["prod-st", *args])
    with pytest.raises(SystemExit) as info:
        main()
    _, err = capsys.readouterr()
    return info.value.code, [line for line in err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["stages"][0].update(lrr=1e-4), "stages.0.lrr"),
        (lambda r: r["stages"][1].update(batch_size="eight"), "stages.1.batch_size"),
        (lambda r: r["stages"][2].update(teacher="ce2"), "unknown teacher 'ce2'"),
        (lambda r: r["data"].update(dataset="/no/such/data"), "does not exist"),
    ],
)
def test_bad_recipes_fail_in_one_line(monkeypatch, capsys, tmp_path, tiny_model_dir, change, message):
    recipe = tiny_recipe(tiny_model_dir)
    change(recipe)
    path = write(tmp_path / "bad.yaml", recipe)
    code, errors = run_cli(monkeypatch, capsys, "run", str(path), "--output", str(tmp_path / "run"))
    assert code == 2 and len(errors) == 1 and message in errors[0]


def test_output_folder_of_another_recipe_is_refused_and_kept(monkeypatch, capsys, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("name: something-else\n")
    (run_dir / "precious.txt").write_text("keep me")
    path = write(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir))
    code, errors = run_cli(monkeypatch, capsys, "run", str(path), "--output", str(run_dir))
    assert code == 2 and "holds a run of a different recipe" in errors[0]
    assert (run_dir / "precious.txt").read_text() == "keep me"
    assert (run_dir / "recipe.yaml").read_text() == "name: something-else\n"


def test_validate_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prod-st", "validate", "quickstart", "wordnet-full"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    for name in ("quickstart", "wordnet-full"):  # one line per recipe: its steps in order, from the recipe itself
        recipe = load_recipe(name)
        steps = [stage.name for stage in recipe.stages] + [f"dpd x{recipe.dpd.rounds}"]
        assert f"{name}: valid ({' -> '.join(steps)})" in out


def test_fillers_are_never_scored_and_become_minus_inf():
    """A query with fewer negatives than the stage asks for: its filler columns are not sent to the teacher
    and carry -inf (masked out of every softmax)."""
    from prod_st.teachers import scores_to_labels
    from prod_st.training.stage_data import FILLER, TrainingRows

    rows = TrainingRows.from_texts(["q1", "q2"], ["a", "b"], ["pa", "pb"], [["n1", "n2"], ["m1", FILLER]])
    assert rows.missing == [[False, False], [False, True]]
    assert rows.real_candidates() == [["pa", "n1", "n2"], ["pb", "m1"]]
    labels = scores_to_labels([[3.0, 1.0, 0.0], [2.0, 1.0]], width=3)
    assert labels[1].tolist() == [2.0, 1.0, float("-inf")]


# ---- the training: block ----

def test_training_block_reaches_the_trainer(tmp_path, tiny_model_dir):
    """bf16 trains under autocast on CPU (the trainer's bf16 flag); gradient accumulation takes batch_size x k
    rows per optimizer step, so one epoch of 16 rows in batches of 2 is 4 steps of 2 forward passes each."""
    import torch

    from prod_st.recipe import Training
    from prod_st.training.student_training import train_student, trainer_settings

    cpu = {} if torch.cuda.is_available() else {"use_cpu": True}  # without a GPU: every rank seen under torchrun
    workers = 0 if not torch.cuda.is_available() else trainer_settings(None)["dataloader_num_workers"]
    assert trainer_settings(None) == {"report_to": "none", "bf16": False, "fp16": False, "logging_nan_inf_filter": False,
                                      "dataloader_num_workers": workers,
                                      "dataloader_persistent_workers": workers > 0} | cpu
    settings = trainer_settings(Training(precision="bf16", report_to=["tensorboard"], dataloader_num_workers=2))
    assert settings.items() >= {"bf16": True, "fp16": False, "gradient_accumulation_steps": 1,
                                "dataloader_num_workers": 2, "report_to": ["tensorboard"]}.items()
    assert settings.get("use_cpu") == (not torch.cuda.is_available())  # bf16 on a CPU-only machine
    model, data, kwargs, counted_loss = _training_setup(tmp_path, tiny_model_dir)
    dtypes = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, inputs, out: dtypes.append(out.dtype))
    loss, calls = counted_loss()
    training = Training(precision="bf16", gradient_accumulation_steps=2)
    result = train_student(model, data, loss, max_steps=None, training=training, progress=False, **kwargs)
    assert result["steps"] == 4 and len(calls) == 8
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_auto_dataloader_workers_tokenise_ahead_on_a_gpu_only(monkeypatch):
    """`auto`: on a GPU, up to 4 worker processes per rank (its share of the cores less one), so the GPU does not
    wait for each batch's tokenising; 0 on the CPU, where they would take the training's cores; a number stays."""
    import os

    import torch

    from prod_st.training import student_training as st

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for local, want in ((None, 4), ("8", 1), ("16", 0)):
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert st.dataloader_workers("auto") == want, local
    assert st.dataloader_workers(3) == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert st.dataloader_workers("auto") == 0 and st.dataloader_workers(2) == 2


def test_tf32_is_set_on_a_gpu_only(monkeypatch):
    """training.tf32 (default on) puts fp32 matmuls in TF32 on a CUDA GPU; without one nothing changes."""
    import torch

    from prod_st.util.precision import set_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert set_tf32(True) is False and torch.backends.cuda.matmul.allow_tf32 is False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert set_tf32(True) is True and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert set_tf32(False) is False and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    import torch

    from prod_st.recipe import Training
    from prod_st.util import precision

    with_amx, without = tmp_path / "amx", tmp_path / "plain"
    with_amx.write_text("processor : 0\nflags : fpu sse avx2 avx512f amx_bf16 amx_tile\n")
    without.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n")
    assert precision.cpu_has_native_bf16(with_amx) and not precision.cpu_has_native_bf16(without)
    assert not precision.cpu_has_native_bf16(tmp_path / "missing")  # not Linux: no native bf16 claimed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, expected in ((True, "bf16"), (False, "fp32")):
        precision.resolve_precision.cache_clear()
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert precision.resolve_precision("auto") == expected
        assert precision.resolve_precision("fp16") == "fp16"  # explicit values are kept as they are
        # the step fingerprints see what auto resolved to: fp32 adds nothing (as a recipe without the block)
        assert Training(precision="auto").results_key() == ({"precision": "bf16"} if native else {})
        assert precision.precision_flags("auto")["bf16"] is native
    precision.resolve_precision.cache_clear()


def test_fp16_training_on_cpu_is_a_one_line_error():
    from prod_st.util.errors import ProdStError
    from prod_st.util.precision import precision_flags

    with pytest.raises(ProdStError, match="fp16 needs a CUDA GPU"):
        precision_flags("fp16")
    cpu = {} if __import__("torch").cuda.is_available() else {"use_cpu": True}
    assert precision_flags("fp32") == {"bf16": False, "fp16": False} | cpu


# ---- run.log, stage lines, --set recorded, --no-progress ----

def test_run_log_stage_lines_and_overrides_recorded(monkeypatch, capsys, tmp_path, tiny_model_dir, toy_beir):
    """`prod-st run R --set ... --no-progress`: the override is in the run's recipe.yaml (value and a comment),
    every log line goes to <run>/run.log, appended by the rerun, with one `stage i of n` line per step."""
    recipe = {
        "name": "eval-only",
        "data": {"dataset": str(toy_beir), "train_split": None, "dev_split": None, "test_split": "test"},
        "student": {"init": tiny_model_dir, "max_doc_length": 64},
        "stages": [],
        "eval": {"top_k": 10},
    }
    path = write(tmp_path / "eval-only.yaml", recipe)
    run_dir = tmp_path / "run"
    from prod_st.util import progress

    monkeypatch.setattr(progress, "ENABLED", True)  # (restored after the test: --no-progress is process-wide)
    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0")
    args = ["run", str(path), "--output", str(run_dir), "--set", "eval.top_k=5", "--no-progress", "-v"]
    code, errors = run_cli(monkeypatch, capsys, *args)
    assert code == 0, errors
    stored = (run_dir / "recipe.yaml").read_text()
    assert stored.startswith("# --set eval.top_k=5\n") and yaml.safe_load(stored)["eval"]["top_k"] == 5
    log = (run_dir / "run.log").read_text()
    assert "recipe eval-only --set eval.top_k=5 in" in log
    assert "stage 1 of 2: 00-init" in log and "stage 2 of 2: final test" in log
    assert "new run in" in log  # logged before the folder existed, kept
    code, errors = run_cli(monkeypatch, capsys, *args)  # the rerun: nothing to do, its lines appended
    assert code == 0, errors
    again = (run_dir / "run.log").read_text()
    assert again.startswith(log) and "run already finished" in again[len(log):]
    assert progress.ENABLED is False


def unit_vectors(model, texts: list[str], role: str):
    """`model`'s embeddings of `texts` as queries or documents, divided by their norms (a cosine model's)."""
    encode = model.encode_query if role == "query" else model.encode_document
    vectors = encode(texts, convert_to_tensor=True, batch_size=256).float()
    return vectors / vectors.norm(dim=-1, keepdim=True)


class EnsembleByHand:
    """The recipe's ens teacher, 0.5 x bi + 0.5 x ce in logits, computed from the trained members' saved models
    with sentence-transformers alone: the bi-encoder's cosine x 20 and the cross-encoder's raw output."""

    def __init__(self, run_dir: Path) -> None:
        import torch
        from sentence_transformers import CrossEncoder, SentenceTransformer

        self.bi = SentenceTransformer(str(run_dir / "teachers" / "bi" / "model"))
        assert self.bi.similarity_fn_name in (None, "cosine")  # its logits: cosine x 20
        self.ce = CrossEncoder(str(run_dir / "teachers" / "ce" / "model"), max_length=48,
                               activation_fn=torch.nn.Identity())

    def members(self, rows: list[tuple[str, list[str]]]) -> list[tuple]:
        """Per (query, candidates) row: (bi logits, ce logits) of the query against each candidate."""
        import torch

        queries = list(dict.fromkeys(q for q, _ in rows))
        docs = list(dict.fromkeys(c for _, cands in rows for c in cands))
        q_at, d_at = {q: i for i, q in enumerate(queries)}, {d: i for i, d in enumerate(docs)}
        cosines = unit_vectors(self.bi, queries, "query") @ unit_vectors(self.bi, docs, "document").T
        pairs = [(q, c) for q, cands in rows for c in cands]
        logits = self.ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True, batch_size=256,
                                 show_progress_bar=False)
        out, start = [], 0
        for q, cands in rows:
            bi = 20.0 * cosines[q_at[q], [d_at[c] for c in cands]].numpy()
            out.append((bi, logits[start:start + len(cands)]))
            start += len(cands)
        return out

    def __call__(self, rows: list[tuple[str, list[str]]]) -> list:
        """Per (query, candidates) row: the ensemble's logits of the query against each candidate."""
        return [0.5 * bi + 0.5 * ce for bi, ce in self.members(rows)]


def check_ensemble_labels(folder: Path, ens: EnsembleByHand) -> int:
    """Every row of a list stage taught by ens: its teacher labels (label[:, 0], -inf at fillers) are the weighted
    sum of the members' scores of the row's query and candidates, and neither member's alone. Returns the rows."""

    rows = read_rows(folder / "train_data").to_dict()
    negatives = sorted(c for c in rows if c.startswith("negative_"))
    labels = [np.asarray(label[0], dtype=np.float32) for label in rows["label"]]
    texts = [[rows["positive"][i], *(rows[c][i] for c in negatives)] for i in range(len(labels))]
    for i, (label, row) in enumerate(zip(labels, texts)):
        assert np.isfinite(label[0]) and list(np.isfinite(label)) == [t != "" for t in row], (folder.name, i)  # fillers
    members = ens.members([(q, [t for t in row if t]) for q, row in zip(rows["query"], texts)])
    for i, (label, (bi, ce)) in enumerate(zip(labels, members)):
        real = label[np.isfinite(label)]
        np.testing.assert_allclose(real, 0.5 * bi + 0.5 * ce, rtol=1e-3, atol=1e-3, err_msg=f"{folder.name} row {i}")
        assert not np.allclose(real, bi, atol=1e-2) and not np.allclose(real, ce, atol=1e-2), (folder.name, i)
    return len(labels)


def dpd_selection_by_hand(runner: Runner, student_folder: Path, ens: EnsembleByHand) -> dict:
    """selection.json as DPD's rule makes it, recomputed from the models: the stage-start student's top
    `rerank_depth` of every training query over the corpus (exact cosine search, float16 corpus vectors as the
    recipe stores them), the ensemble's reranking of that list (stable: ties keep the student's order), and the
    msmarco rule on the 1-based ranks of the first relevant document."""
    import torch

    from prod_st.data import document_text

    spec, data = runner.recipe.dpd, runner.data
    rule = spec.rule
    assert rule.variant == "msmarco" and spec.negatives == "sample"  # a kept query keeps its whole near-miss pool
    corpus = data.corpus
    doc_ids = list(corpus["_id"])
    texts = [document_text(t, x) for t, x in zip(corpus["title"], corpus["text"])]
    queries = data.train.split_queries()
    student = runner.load_student(student_folder)
    assert student.similarity_fn_name in (None, "cosine")
    scores = unit_vectors(student, list(queries.values()), "query") @ unit_vectors(student, texts, "document").half().float().T
    top = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :spec.rerank_depth].tolist()
    reasons, asked = {}, {}
    for qid, ranked in zip(queries, top):
        ranked = [doc_ids[r] for r in ranked]
        relevant = {d for d, grade in data.train.qrels.get(qid, {}).items() if grade > 0}
        student_rank = next((i for i, d in enumerate(ranked, 1) if d in relevant), None)
        if not relevant:
            reasons[qid] = "no_qrels"
        elif student_rank is None:
            reasons[qid] = "student_missed"
        elif student_rank < rule.student_min:
            reasons[qid] = "student_top1"
        elif student_rank > rule.student_max:
            reasons[qid] = "student_too_far"
        else:  # the teacher decides
            asked[qid] = (ranked, relevant)
    ens_scores = ens([(queries[q], [texts[doc_ids.index(d)] for d in ranked]) for q, (ranked, _) in asked.items()])
    kept = {}
    for (qid, (ranked, relevant)), scores in zip(asked.items(), ens_scores):
        reranked = [d for _, d in sorted(zip((-scores).tolist(), ranked), key=lambda pair: pair[0])]  # stable
        teacher_rank = next(i for i, d in enumerate(reranked, 1) if d in relevant)
        reasons[qid] = "teacher_wrong" if teacher_rank > rule.teacher_max else "kept"
        if reasons[qid] == "kept":
            kept[qid] = [d for d in ranked if d not in relevant]
    counts = dict.fromkeys(["kept", "student_top1", "student_too_far", "student_missed", "teacher_wrong", "no_qrels"], 0)
    counts.update(Counter(reasons.values()))
    return {"counts": counts, "kept": kept}


def test_an_ensemble_teacher_stage_and_dpd_run_to_the_end(tmp_path, tiny_model_dir, monkeypatch):
    """The chain's third step as an ensemble of the trained teachers: its stage (list candidates, with the
    regularisation whose stage-start cache is pruned after it) and DPD's rerank run, and the run tests it.
    The ensemble's labels are the weighted sum of its members' scores; DPD keeps exactly the training queries
    its rule keeps (recomputed here from the models), trains on them and changes the student. The recipe asks
    for float16 corpus embeddings: every corpus encoding of the run is float16."""
    import pyarrow as pa
    from sentence_transformers import SentenceTransformer

    from prod_st.util.fingerprint import model_fingerprint

    recipe = tiny_recipe(tiny_model_dir)
    recipe["teachers"]["ens"] = {"kind": "ensemble", "members": {"bi": 0.5, "ce": 0.5}}
    recipe["stages"].append(recipe["stages"][2] | {"name": "ens", "teacher": "ens"})
    # a rule wide enough that this tiny student has near misses (at the defaults it keeps none here), yet one
    # where the teacher still decides
    recipe["dpd"] |= {"teacher": "ens", "rerank_depth": 100, "rule": {"student_max": 100, "teacher_max": 20}}
    recipe["eval"]["corpus_dtype"] = "float16"
    dtypes = Counter()
    embeddings = corpus_index.corpus_embeddings

    def spy(*args, **kwargs):
        blocks = embeddings(*args, **kwargs)
        dtypes[str(blocks[0].dtype)] += 1
        return blocks

    monkeypatch.setattr(corpus_index, "corpus_embeddings", spy)
    corpus_index._last_index.clear()
    run_dir = tmp_path / "run"
    runner = Runner(load_recipe(write(tmp_path / "ens.yaml", recipe)), run_dir)
    final = runner.run()
    # dev evaluations, mining (the teachers' and the stages'), the bi teacher's evaluation, DPD, the test
    assert set(dtypes) == {"float16"} and dtypes["float16"] >= 8, dtypes
    assert (run_dir / "04-ens" / "DONE").exists() and (run_dir / "05-dpd-1" / "DONE").exists()
    assert set(final["test"]["teachers"]) == {"bi", "ce", "ens"}
    assert final["test"]["teachers"]["ens"]["as"].startswith("reranker")
    metrics = json.loads((run_dir / "04-ens" / "metrics.json").read_text())
    assert metrics["teacher"] == "ens" and metrics["train"]["steps"] == 3

    # the ensemble's labels: 0.5 x bi + 0.5 x ce for every row it labelled, in its stage and in DPD
    ens = EnsembleByHand(run_dir)
    draws = json.loads((run_dir / "04-ens" / "negatives.json").read_text())["epochs"]
    assert check_ensemble_labels(run_dir / "04-ens", ens) == len(runner.data.train.qrels) * draws

    # DPD kept exactly the queries its rule keeps, with their near-miss pools, and the teacher decided some
    selection = json.loads((run_dir / "05-dpd-1" / "selection.json").read_text())
    assert selection == dpd_selection_by_hand(runner, run_dir / "04-ens", ens)
    counts = selection["counts"]
    assert counts["kept"] > 0 and counts["teacher_wrong"] > 0 and sum(counts.values()) == len(runner.data.train.qrels)
    dpd = json.loads((run_dir / "05-dpd-1" / "metrics.json").read_text())
    assert dpd["selection"] == counts and not any("no training query" in w for w in dpd["warnings"])

    # ... and trained on them: every epoch's block holds each kept query once, its positive judged relevant,
    # its negatives drawn from its pool; the planned steps ran and the student changed
    ids = pa.ipc.open_file(run_dir / "05-dpd-1" / "row_ids.arrow").read_all().to_pylist()
    epochs = json.loads((run_dir / "05-dpd-1" / "negatives.json").read_text())["epochs"]
    assert epochs >= 1 and len(ids) == epochs * counts["kept"]
    for block in range(epochs):
        assert sorted(r["query_id"] for r in ids[block * counts["kept"]:(block + 1) * counts["kept"]]) == sorted(selection["kept"])
    for row in ids:
        positive, *negatives = row["corpus_ids"]
        assert runner.data.train.qrels[row["query_id"]].get(positive, 0) > 0
        assert negatives and set(negatives) <= set(selection["kept"][row["query_id"]])
    queries = runner.data.train.split_queries()
    trained_on = read_rows(run_dir / "05-dpd-1" / "train_data")
    assert trained_on["query"] == [queries[r["query_id"]] for r in ids]  # train_data, row for row
    assert check_ensemble_labels(run_dir / "05-dpd-1", ens) == len(ids)
    assert dpd["train"]["steps"] == recipe["dpd"]["max_steps"] > 0
    before, after = (model_fingerprint(SentenceTransformer(str(run_dir / name / "student"))) for name in ("04-ens", "05-dpd-1"))
    assert before != after
