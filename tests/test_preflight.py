"""Checks before a run (prod_st.run.preflight): what a valid recipe names on disk, found in a second, without
loading weights. Model folders here are fakes (modules.json + config.json): preflight only reads those."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prod_st.recipe import load_recipe, parse_recipe
from prod_st.run.preflight import check_recipe, preflight
from prod_st.util.errors import ProdStError
from prod_st.util.model_paths import resolve_model_path


def fake_model(folder: Path, layers: int = 2, *, sub: str = "0_Transformer") -> Path:
    """A SentenceTransformer-looking folder whose Transformer module (in `sub`) has `layers` layers."""
    (folder / sub).mkdir(parents=True, exist_ok=True)
    modules = [{"idx": 0, "name": "0", "path": sub, "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / sub / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": layers}))
    return folder


def fake_run(folder: Path, *, finished: bool = True, name: str = "prev") -> Path:
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"name: {name}\n")
    if finished:
        fake_model(folder / "student", layers=3)
    return folder


def recipe(student: str = "all-MiniLM-L6-v2", num_layers: int | None = 3, **changes) -> dict:
    data = {
        "name": "check",
        "data": {"dataset": "wordnet-gloss"},
        "student": {"init": student, "num_layers": num_layers},
        "teachers": {
            "bi": {"kind": "bi-encoder", "model": "all-MiniLM-L6-v2"},
            "ce": {"kind": "cross-encoder", "train": {"backbone": "all-MiniLM-L6-v2", "negatives_from": "bi"}},
        },
        "stages": [{"name": "warmup", "kind": "warmup"}, {"name": "ce", "teacher": "ce"}],
    }
    data.update(changes)
    return data


def problems(data: dict) -> list[str]:
    return check_recipe(parse_recipe(data))


def evaluate_only(dataset: str, init: str, **data) -> dict:
    return {"name": "eval", "data": {"dataset": dataset, "train_split": None, "dev_split": None, **data},
            "student": {"init": init}, "stages": []}


# ------------------------------------------------------------------------------------------------ models
def test_a_good_recipe_has_no_problems():
    assert problems(recipe()) == []


def test_num_layers_above_the_models_depth():
    assert problems(recipe(num_layers=7)) == ["student.num_layers: 7 is more than the 6 layers of 'all-MiniLM-L6-v2'"]
    assert problems(recipe(num_layers=6)) == []


def test_num_layers_read_from_the_transformer_module_folder(tmp_path):
    model = str(fake_model(tmp_path / "m", layers=2))
    assert problems(recipe(model, num_layers=2)) == []
    assert problems(recipe(model, num_layers=3)) == [f"student.num_layers: 3 is more than the 2 layers of {model!r}"]
    plain = tmp_path / "plain"  # a transformers folder: config.json at the root, no modules.json
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"n_layers": 4}))
    assert problems(recipe(str(plain), num_layers=5)) == [
        f"student.num_layers: 5 is more than the 4 layers of {str(plain)!r}"
    ]


def test_every_missing_model_path_is_reported_with_its_field(tmp_path):
    data = recipe(str(tmp_path / "no-student"))
    data["teachers"]["bi"]["model"] = "./no-bi"
    data["teachers"]["ce"]["train"]["backbone"] = "~/no/such/backbone"
    data["stages"][0]["negatives"] = {"miner": str(tmp_path / "no-miner")}
    found = problems(data)
    assert found == [
        f"student.init: model folder {str(tmp_path / 'no-student')!r} does not exist",
        "teachers.bi.model: model folder './no-bi' does not exist",
        "teachers.ce.train.backbone: model folder '~/no/such/backbone' does not exist",
        f"stages.0.negatives.miner: model folder {str(tmp_path / 'no-miner')!r} does not exist",
    ]


def test_a_file_or_an_empty_folder_is_not_a_model(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    file, empty = str(tmp_path / "file"), str(tmp_path / "empty")
    assert problems(recipe(file)) == [f"student.init: {file!r} is a file, not a model folder"]
    [found] = problems(recipe(empty))
    assert found.startswith(f"student.init: {empty!r} is not a model folder (no modules.json or config.json")


def test_hub_ids_are_checked_only_when_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert problems(recipe("someone/not-cached", num_layers=99)) == []  # cannot be checked here: left to the run
    snapshot = tmp_path / "hub" / "models--someone--cached" / "snapshots" / "abc123"
    fake_model(snapshot, layers=12, sub="")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    assert problems(recipe("someone/cached", num_layers=12)) == []
    assert problems(recipe("someone/cached", num_layers=24)) == [
        "student.num_layers: 24 is more than the 12 layers of 'someone/cached'"
    ]
    [found] = problems(recipe("not a model!"))
    assert found.startswith("student.init: 'not a model!' is neither a local folder, a packaged model")


def test_a_run_folder_means_its_final_student(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "prev")
    assert resolve_model_path(str(run)) == str(run / "student")
    assert problems(evaluate_only("wordnet-gloss", str(run))) == []
    assert problems(recipe(str(run), num_layers=4)) == [
        f"student.num_layers: 4 is more than the 3 layers of {str(run)!r}"
    ]


def test_a_run_that_has_not_finished_says_so(tmp_path):
    run = fake_run(tmp_path / "prev", finished=False)
    with pytest.raises(ProdStError, match="has no student/ yet: its run has not finished"):
        resolve_model_path(str(run))  # what the runner's build_student would meet
    assert problems(evaluate_only("wordnet-gloss", str(run))) == [
        f"student.init: run folder {str(run)!r} has no student/ yet: the run in {run} has not finished: run its "
        "recipe again to finish it"
    ]
    assert problems(evaluate_only("wordnet-gloss", str(run / "student"))) == [
        f"student.init: model folder {str(run / 'student')!r} does not exist yet: the run in {run} has not "
        "finished: run its recipe again to finish it"
    ]


def test_a_named_run_that_never_ran_says_which_recipe_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert problems(evaluate_only("wordnet-gloss", "runs/msmarco-passage/student")) == [
        "student.init: model folder 'runs/msmarco-passage/student' does not exist yet: run "
        "recipes/msmarco-passage.yaml first (`prod-st run msmarco-passage` writes runs/msmarco-passage/student)"
    ]
    [found] = problems(evaluate_only("wordnet-gloss", "./runs/msmarco-doc"))  # the run folder itself
    assert found.endswith("does not exist yet: run recipes/msmarco-doc.yaml first (`prod-st run msmarco-doc` writes "
                          "runs/msmarco-doc/student)")
    fake_run(tmp_path / "runs" / "msmarco-passage", finished=False, name="msmarco-passage")
    [found] = problems(evaluate_only("wordnet-gloss", "runs/msmarco-passage/student"))
    assert found.endswith("has not finished: run recipes/msmarco-passage.yaml again to finish it")


# ------------------------------------------------------------------------------------------------ data
def test_missing_or_unknown_dataset(tmp_path):
    assert problems(recipe(data={"dataset": str(tmp_path / "nope")})) == [
        f"data.dataset: dataset folder {str(tmp_path / 'nope')!r} does not exist (or is not a folder)"
    ]
    [found] = problems(recipe(data={"dataset": "wordnet"}))
    assert found.startswith("data.dataset: unknown dataset 'wordnet'")
    (tmp_path / "stuff").mkdir()
    [found] = problems(recipe(data={"dataset": str(tmp_path / "stuff")}))
    assert found.startswith("data.dataset: ") and "not a dataset folder" in found


def test_a_dataset_that_is_not_here_is_reported_with_where_its_data_comes_from(tmp_path, toy_beir):
    """The recipe header's `Data:` paragraph (recipe.data_origin) ends the data.dataset problem, whether the folder
    or a split file is missing; a recipe without one reports the problem alone."""
    from prod_st.recipe import data_origin

    data = recipe(data={"dataset": str(tmp_path / "nope")})
    path = tmp_path / "r.yaml"
    import yaml

    header = "# r: a recipe.\n#\n# Data: the release files, from https://example.org/data,\n# put in nope/.\n#\n# More.\n"
    path.write_text(header + yaml.safe_dump(data))
    assert data_origin(path) == "the release files, from https://example.org/data, put in nope/."
    with pytest.raises(ProdStError) as info:
        preflight(parse_recipe(data), str(path))
    assert str(info.value) == (f"{path}: data.dataset: dataset folder {str(tmp_path / 'nope')!r} does not exist (or is "
                               "not a folder) (where the data comes from: the release files, from "
                               "https://example.org/data, put in nope/.)")
    data["data"]["dataset"] = str(toy_beir)  # here, but without the train and dev splits: the last line says it
    path.write_text(header + yaml.safe_dump(data))
    with pytest.raises(ProdStError) as info:
        preflight(parse_recipe(data), str(path))
    assert str(info.value).endswith("no qrels for split 'dev' (available: test) (where the data comes from: the "
                                    "release files, from https://example.org/data, put in nope/.)")
    path.write_text(yaml.safe_dump(data))  # no header: no note
    assert data_origin(path) is None
    with pytest.raises(ProdStError) as info:
        preflight(parse_recipe(data), str(path))
    assert "where the data comes from" not in str(info.value)


def test_each_split_the_run_reads_must_exist(toy_beir):
    # the toy folder has only test qrels: training on it fails, evaluating only does not
    assert problems(recipe(data={"dataset": str(toy_beir)})) == [
        f"data.train_split: {toy_beir}: no qrels for split 'train' (available: test)",
        f"data.dev_split: {toy_beir}: no qrels for split 'dev' (available: test)",
    ]
    assert problems(recipe(data={"dataset": "wordnet-gloss", "dev_split": "validation"})) == [
        f"data.dev_split: {Path(__import__('prod_st.data.sources').data.sources.EMBEDDED['wordnet-gloss'])}: no qrels "
        "for split 'validation' (available: dev, test, train)"
    ]
    # evaluate-only: the train split (even the default 'train') is never read, so never checked
    model = "all-MiniLM-L6-v2"
    assert problems(evaluate_only(str(toy_beir), model)) == []
    assert problems({**evaluate_only(str(toy_beir), model), "data": {"dataset": str(toy_beir)}}) == [
        f"data.dev_split: {toy_beir}: no qrels for split 'dev' (available: test)"
    ]
    assert problems(evaluate_only(str(toy_beir), model, test_split="dl19")) == [
        f"data.test_split: {toy_beir}: no qrels for split 'dl19' (available: test)"
    ]


def test_a_file_every_split_needs_is_the_folders_problem(toy_beir):
    (toy_beir / "corpus.jsonl").rename(toy_beir / "corpus.txt")
    for split in ("train", "dev"):
        (toy_beir / "qrels" / f"{split}.tsv").write_text((toy_beir / "qrels" / "test.tsv").read_text())
    assert problems(recipe(data={"dataset": str(toy_beir)})) == [
        f"data.dataset: {toy_beir}: no corpus.jsonl (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)"
    ]


def test_original_release_layouts_name_their_missing_files(tmp_path):
    msmarco = tmp_path / "msmarco-passage"
    msmarco.mkdir()
    for name in ("collection.tsv", "msmarco-test2019-queries.tsv", "2019qrels-pass.txt"):
        (msmarco / name).write_text("")
    data = evaluate_only(str(msmarco), "all-MiniLM-L6-v2")
    assert problems(data) == []
    [found] = problems({**data, "data": {**data["data"], "dev_split": "dev"}})
    assert found.startswith(f"data.dev_split: {msmarco}: split 'dev' of the MS MARCO passage layout needs")
    assert found.endswith("missing: queries.dev.small.tsv, qrels.dev.small.tsv")
    nq = tmp_path / "nq"
    nq.mkdir()
    (nq / "psgs_w100.tsv").write_text("")
    [found] = problems(evaluate_only(str(nq), "all-MiniLM-L6-v2"))
    assert found.startswith(f"data.test_split: {nq}: split 'test' of the DPR Natural Questions layout needs")


def test_beir_names_are_checked_once_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path / "cache"))
    data = recipe(eval={"beir": ["scifact", str(tmp_path / "no-beir")]})
    assert problems(data) == [  # scifact is not downloaded: left to the run; the missing folder is not
        f"eval.beir.1: dataset folder {str(tmp_path / 'no-beir')!r} does not exist (or is not a folder)"
    ]
    assert not (tmp_path / "cache").exists()  # checking downloads nothing and creates nothing
    scifact = tmp_path / "cache" / "beir" / "scifact"
    (scifact / "qrels").mkdir(parents=True)
    (scifact / "corpus.jsonl").write_text("")
    (scifact / "queries.jsonl").write_text("")
    assert problems(recipe(eval={"beir": ["scifact"]})) == [
        f"eval.beir.0: {scifact}: no qrels for split 'test' (available: none)"
    ]


# ------------------------------------------------------------------------------------------------ the whole
def test_preflight_is_one_line_with_every_problem(tmp_path):
    data = recipe(num_layers=9, data={"dataset": "wordnet-gloss", "dev_split": "nope"})
    with pytest.raises(ProdStError) as info:
        preflight(parse_recipe(data), "my.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("my.yaml: student.num_layers: 9 is more than the 6 layers")
    assert "; data.dev_split: " in message
    preflight(parse_recipe(recipe()), "fine.yaml")  # no problem: no error


def test_a_training_sample_too_small_for_the_index_is_refused():
    """An IVF or PQ index needs 39 training vectors per centroid (faiss's k-means warns below; it fails below 1):
    recipes/nq.yaml's advice for smaller machines, IVF65536,PQ64, with the default sample of 32768 is refused,
    with the size it needs it passes."""
    assert problems(recipe(eval={"index": "IVF65536,PQ64"})) == [
        "eval.index_train_size: 32768 vectors are too few to train 'IVF65536,PQ64': its IVF65536 learns 65536 "
        "centroids and needs at least 2555904 (39 per centroid, below which faiss's k-means warns); set "
        "eval.index_train_size: 2555904 or use fewer centroids"]
    assert problems(recipe(eval={"index": "IVF65536,PQ64", "index_train_size": 2555904})) == []
    assert problems(recipe(eval={"index": "IVF840,Flat"})) == []  # 39 x 840 = 32760: the default sample's most
    assert problems(recipe(eval={"index": "IVF841,Flat"}))[0].startswith("eval.index_train_size: 32768 vectors")
    assert "its PQ16 learns 256 centroids" in problems(recipe(eval={"index": "PQ16", "index_train_size": 9983}))[0]
    assert problems(recipe(eval={"index": "PQ16", "index_train_size": 9984})) == []
    assert "its PQ16x4 learns 16" in problems(recipe(eval={"index": "PQ16x4", "index_train_size": 100}))[0]
    for untrained in ("Flat", "SQfp16", "HNSW32", "SQ8"):
        assert problems(recipe(eval={"index": untrained, "index_train_size": 1})) == []
    advice = (Path(__file__).parents[1] / "recipes" / "nq.yaml").read_text()  # as written in its comment
    assert "index: IVF65536,PQ64 with index_train_size: 2555904" in advice
    as_advised = load_recipe("nq", ["eval.index=IVF65536,PQ64", "eval.index_train_size=2555904"])
    assert [p for p in check_recipe(as_advised) if p.startswith("eval.")] == []
    assert [p for p in check_recipe(load_recipe("nq", ["eval.index=IVF65536,PQ64"])) if p.startswith("eval.")]


def test_preflight_imports_no_torch():
    """`prod-st validate` stays fast: the CLI, the schema and these checks import neither torch nor
    sentence-transformers."""
    code = (
        "import sys; from prod_st_cli import main; from prod_st.run.preflight import check_recipe; "
        "from prod_st.recipe import load_recipe; "
        f"assert check_recipe(load_recipe({str(Path(__file__).parents[1] / 'recipes' / 'quickstart.yaml')!r})) == []; "
        "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
