"""`prod-st export`: a tiny run's distill stages as datasets (text and id layouts, corpus and queries), their card,
bad inputs, --push / --dry-run with a fake Hub API, and a plain sentence-transformers model trained on the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import yaml
from test_publish import FakeHubApi, http_error
from test_runner import tiny_recipe

from prod_st.publish.export import export_run, push_export, teacher_scores
from prod_st.training.stage_data import ROW_IDS, read_rows

STAGES = ["02-bi", "03-ce"]  # the tiny run's distill stages (its DPD round keeps no query: nothing to export)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A real tiny run (warm-up, in-batch bi stage, list ce stage with PROD's regulariser, DPD), its teacher
    caches in the session's PROD_ST_CACHE (the one the tests read)."""
    from prod_st.recipe import load_recipe
    from prod_st.runner import Runner

    os.environ["PROD_ST_CACHE"] = str(tmp_path_factory.getbasetemp() / "prod-st-cache")
    folder = tmp_path_factory.mktemp("export-run")
    recipe = tiny_recipe(tiny_model_dir)
    recipe["stages"][0]["max_steps"] = 2
    (folder / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    Runner(load_recipe(folder / "tiny.yaml"), folder / "run", progress=False).run()
    return folder / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("export") / "out"
    return out, export_run(run_dir, out, progress=False)


def load(out: Path, config: str) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(out / "data" / config / "*.parquet"), split="train")


def test_layouts_and_their_columns(exported, run_dir):
    out, stages = exported
    assert [s.folder for s in stages] == STAGES
    for stage in stages:
        train = read_rows(run_dir / stage.folder / "train_data")
        negatives = [f"negative_{j}" for j in range(1, stage.negatives + 1)]
        text = load(out, stage.folder)
        assert text.column_names == ["query", "positive", *negatives, "score"]
        assert len(text) == stage.text_rows == len(train) > 0  # no fillers in these stages: every row
        assert text["query"] == train["query"] and text["positive"] == train["positive"]
        assert all(len(s) == 1 + len(negatives) for s in text["score"])
        ids = load(out, f"{stage.folder}-ids")
        assert ids.column_names == ["query_id", "corpus_ids", "scores"] and len(ids) == len(train)
        np.testing.assert_array_equal(np.array(ids["scores"]), np.array(text["score"]))
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert {c["config_name"] for c in card["configs"]} == {*STAGES, *(f"{s}-ids" for s in STAGES), "corpus", "queries"}


def test_ce_scores_are_the_cached_teacher_scores_positive_first(exported, run_dir, monkeypatch):
    """The list stage (its labels carry the regulariser's second row): the cross-encoder's cached raw logits of
    (query, positive), (query, negative_1), ... in that order, served from the cache alone."""
    from prod_st.teachers import CrossEncoderTeacher

    out, _ = exported
    teacher = CrossEncoderTeacher(str(run_dir / "teachers" / "ce" / "model"), max_length=48)
    monkeypatch.setattr(teacher, "_predict", lambda pairs: pytest.fail(f"{len(pairs)} pairs not in the cache"))
    text = load(out, "03-ce").to_dict()
    lists = [list(c) for c in zip(text["positive"], text["negative_1"], text["negative_2"])]
    cached = teacher.score(text["query"], lists, progress=False)
    np.testing.assert_allclose(np.array(text["score"]), np.array(cached), rtol=1e-6)


def test_bi_scores_are_the_teachers_cosine_times_20(exported, run_dir):
    """The in-batch stage keeps teacher embeddings as labels: the export's scores are 20 x cosine(query, doc) of
    the bi-encoder teacher, positive first."""
    from sentence_transformers import SentenceTransformer

    out, _ = exported
    text = load(out, "02-bi").to_dict()
    teacher = SentenceTransformer(str(run_dir / "teachers" / "bi" / "model"))
    q = teacher.encode_query(text["query"], normalize_embeddings=True)
    p = teacher.encode_document(text["positive"], normalize_embeddings=True)
    n = teacher.encode_document(text["negative_1"], normalize_embeddings=True)
    want = 20.0 * np.stack([(q * p).sum(1), (q * n).sum(1)], axis=1)
    np.testing.assert_allclose(np.array(text["score"]), want, rtol=1e-3, atol=1e-3)


def test_ids_layout_joins_the_corpus_and_queries(exported):
    out, _ = exported
    corpus, queries = load(out, "corpus").to_dict(), load(out, "queries").to_dict()
    assert len(set(corpus["_id"])) == len(corpus["_id"]) and len(set(queries["_id"])) == len(queries["_id"])
    doc, query = dict(zip(corpus["_id"], corpus["text"])), dict(zip(queries["_id"], queries["text"]))
    for stage in STAGES:
        ids, text = load(out, f"{stage}-ids").to_dict(), load(out, stage).to_dict()
        columns = [c for c in text if c not in ("query", "score")]
        for i, (qid, docs) in enumerate(zip(ids["query_id"], ids["corpus_ids"])):
            assert query[qid] == text["query"][i]
            assert [doc[d] for d in docs] == [text[c][i] for c in columns]  # positive first, then the negatives
    assert all(d[0] in "nvasr" and d[1:].isdigit() for d in corpus["_id"])  # wordnet-gloss's own synset ids


def test_card_names_teacher_strength_stage_recipe_scale_and_loading(exported, run_dir):
    out, stages = exported
    card = (out / "README.md").read_text()
    bi = json.loads((run_dir / "02-bi" / "metrics.json").read_text())
    warmup = json.loads((run_dir / "01-warmup" / "metrics.json").read_text())
    assert "# Teacher scores of the PROD run `tiny` (wordnet-gloss)" in card
    assert "## Stage `02-bi` (distill)" in card and "## Stage `03-ce` (distill)" in card
    assert "`bi`: a bi-encoder trained in the run" in card and "`ce`: a cross-encoder trained in the run" in card
    assert "the bi-encoder's cosine similarity x 20" in card and "raw logits of the cross-encoder" in card
    assert f"as retriever: nDCG@10 {bi['teacher_dev']['nDCG@10']:.4f}" in card  # the strength check, with numbers
    assert f"before the stage: {warmup['student_dev']['nDCG@10']:.4f}" in card
    assert "candidates: in_batch" in card and "candidates: list" in card
    assert "reg_weight: 1.0" in card and "count: 2" in card  # the stage's recipe block
    assert 'load_dataset("parquet", data_files=' in card and "DistillKLDivLoss" in card
    assert (out / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    assert f"{stages[1].text_rows:,} | 2 | {stages[1].pairs:,} |" in card


def test_row_ids_file_is_row_for_row_with_train_data(run_dir):
    """What the runner now keeps: the rows' ids, and what the labels are."""
    with pa.memory_map(str(run_dir / "03-ce" / ROW_IDS)) as source:
        table = pa.ipc.open_file(source).read_all()
    meta = json.loads(table.schema.metadata[b"prod_st"])
    assert meta == {"teacher": "ce", "kind": "cross-encoder", "scale": 1.0, "candidates": "list"}
    train = read_rows(run_dir / "03-ce" / "train_data")
    assert table.num_rows == len(train) and table.column("corpus_ids").type.list_size == 3
    assert not (run_dir / "01-warmup" / ROW_IDS).exists()  # the warm-up has no teacher


def test_teacher_scores_of_every_label_layout():
    rows = np.array([[1.0, 2.0, -np.inf]], np.float32)
    plain = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 3)
    np.testing.assert_array_equal(teacher_scores(plain), rows)
    reg = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([rows, np.full_like(rows, 7)]).reshape(-1)), 3), 2)
    np.testing.assert_array_equal(teacher_scores(reg), rows)  # the teacher's row, not the student's
    emb = np.array([[[20.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], np.float32)  # [query x 20, positive, negative]
    nested = pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 2), 3)
    np.testing.assert_array_equal(teacher_scores(nested), [[20.0, 0.0]])
    two = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(6, dtype=np.float32)), 3)
    np.testing.assert_array_equal(teacher_scores(two.slice(1, 1)), [[3.0, 4.0, 5.0]])  # a slice's offset


def run_cli(monkeypatch, capsys, *args):
    from prod_st_cli.main import main

    monkeypatch.setattr(sys, "argv", ["prod-st", "export", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in captured.err
    return info.value.code, errors, captured.out


def test_bad_inputs_are_one_line_and_exit_2(run_dir, tmp_path, monkeypatch, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("not prod-st's")
    cases = [
        ((str(tmp_path), str(tmp_path / "o1")), "is not a prod-st run folder"),
        ((str(tmp_path / "nowhere"), str(tmp_path / "o2")), "run folder not found"),
        ((str(run_dir), str(tmp_path / "o3"), "--stage", "nope"), "stages: 02-bi, 03-ce"),
        ((str(run_dir), str(tmp_path / "o4"), "--stage", "warmup"), "no stage 'warmup' with teacher scores"),
        ((str(run_dir), str(busy)), "exists and is not empty"),
        ((str(run_dir), str(tmp_path / "o5"), "--push"), "--push and --dry-run need --repo-id"),
        ((str(run_dir), str(tmp_path / "o6"), "--push", "--repo-id", "not a repo"), "invalid Hub repository id"),
        ((str(run_dir), str(tmp_path / "o7"), "--private"), "go with --push"),
    ]
    for args, message in cases:
        code, errors, _ = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, errors)
    assert (busy / "mine.txt").read_text() == "not prod-st's" and sorted(os.listdir(busy)) == ["mine.txt"]
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


def test_one_stage_one_format_by_stage_name(run_dir, tmp_path, monkeypatch, capsys):
    code, _, out = run_cli(monkeypatch, capsys, str(run_dir), str(tmp_path / "ce"), "--stage", "ce",
                           "--format", "text", "--no-progress")
    assert code == 0 and "03-ce: " in out and "dataset written to" in out
    assert sorted(os.listdir(tmp_path / "ce" / "data")) == ["03-ce"]
    assert "corpus" not in (tmp_path / "ce" / "README.md").read_text().split("---")[1]


def test_dry_run_writes_the_upload_folder_and_push_uploads_it(run_dir, tmp_path, monkeypatch, capsys):
    import prod_st.util.hub as hub

    monkeypatch.setattr(hub, "hub_api", lambda *a, **k: pytest.fail("--dry-run must not touch the Hub"))
    code, _, out = run_cli(monkeypatch, capsys, str(run_dir), str(tmp_path / "up"), "--push", "--dry-run",
                           "--repo-id", "me/tiny-scores", "--no-progress")
    assert code == 0 and (tmp_path / "up" / "data" / "03-ce" / "train-00000.parquet").is_file()
    assert 'load_dataset("me/tiny-scores", "02-bi", split="train")' in (tmp_path / "up" / "README.md").read_text()

    api = FakeHubApi()
    url = push_export(tmp_path / "up", "me/tiny-scores", private=True, api=api)
    assert url == "https://huggingface.co/me/tiny-scores"  # what the fake's create_repo returns
    (_, create), (_, upload) = api.calls
    assert create["repo_type"] == "dataset" and create["private"] is True
    assert upload["repo_type"] == "dataset" and Path(upload["folder_path"]) == tmp_path / "up"
    assert "README.md" in api.uploaded and "data/02-bi-ids/train-00000.parquet" in api.uploaded

    with pytest.raises(Exception) as error:  # the Hub's errors: one line, as `prod-st push` says them
        push_export(tmp_path / "up", "me/tiny-scores", api=FakeHubApi(fail_upload=http_error(403)))
    assert "cannot write to 'me'" in str(error.value) and "--exist-ok" in str(error.value)


TRAIN_PLAIN = textwrap.dedent("""
    import json
    import sys
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import DistillKLDivLoss

    out, model_dir, work = sys.argv[1:4]
    train = load_dataset("parquet", data_files=f"{out}/data/03-ce/*.parquet", split="train")
    model = SentenceTransformer(model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(output_dir=work, max_steps=3, per_device_train_batch_size=4,
                                                learning_rate=1e-3, report_to="none", use_cpu=True,
                                                save_strategy="no", logging_steps=1)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train, loss=DistillKLDivLoss(model))
    result = trainer.train()
    changed = any((a != b.detach()).any().item() for a, b in zip(before, model.parameters()))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print("RESULT " + json.dumps({"steps": result.global_step, "changed": changed, "losses": losses,
                                  "prod_st": any(m.startswith("prod_st") for m in sys.modules)}))
""")


def test_plain_sentence_transformers_trains_on_an_exported_stage(exported, tiny_model_dir, tmp_path):
    """A few DistillKLDivLoss steps of a plain SentenceTransformerTrainer on the exported ce stage, in a process
    that never imports prod_st."""
    out, _ = exported
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", TRAIN_PLAIN, str(out), tiny_model_dir, str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["steps"] == 3 and result["changed"] and not result["prod_st"], result
    assert len(result["losses"]) == 3 and all(np.isfinite(result["losses"])), result
