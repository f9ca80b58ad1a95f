"""The `prod-st` command line: one-line errors with exit code 2, the eval table and its JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prod_st_cli.main import main


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["prod-st", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_eval_prints_table_and_writes_json(monkeypatch, capsys, toy_beir, tmp_path):
    output = tmp_path / "m" / "metrics.json"
    code, out, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), "--output", str(output))
    assert code == 0, err
    assert "nDCG@10" in out and "4 queries, 6 docs" in out
    saved = json.loads(output.read_text())
    assert saved["num_queries"] == 4 and set(saved["metrics"]) >= {"nDCG@10", "MRR@10", "R@100", "MAP@1000"}
    assert 0.0 < saved["metrics"]["MRR@10"] <= 1.0


def test_eval_search_backend_and_index_train_size_reach_the_search(monkeypatch, capsys, toy_beir, tmp_path):
    """`--search torch` (exact search with torch, here on the CPU) gives faiss's metrics; `--index-train-size`
    is the trained index's sample (and is recorded in the JSON when not the default)."""
    import prod_st.retrieval.corpus_index as ci
    from prod_st.retrieval.exact_search import TorchFlatIndex

    metrics = {}
    for backend in ("faiss", "torch"):
        out_file = tmp_path / f"{backend}.json"
        code, _, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), "--search", backend,
                               "--output", str(out_file))
        assert code == 0, err
        assert isinstance(ci._last_index["index"], TorchFlatIndex) == (backend == "torch")
        metrics[backend] = json.loads(out_file.read_text())["metrics"]
    assert metrics["torch"] == pytest.approx(metrics["faiss"])
    trained = []
    real = ci.train_index
    monkeypatch.setattr(ci, "train_index", lambda index, name, vectors: trained.append(len(vectors)) or real(
        index, name, vectors))
    code, _, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), "--index", "IVF2,Flat",
                           "--index-train-size", "3", "--output", str(tmp_path / "ivf.json"))
    assert code == 0, err
    assert trained == [3] and json.loads((tmp_path / "ivf.json").read_text())["index_train_size"] == 3


def test_student_command(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, out, _ = run_cli(monkeypatch, capsys, "student", tiny_model_dir, str(tmp_path / "s"), "--layers", "1")
    assert code == 0 and "first 1 layers" in out
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "all-MiniLM-L6-v2", "/no/such/folder"], "does not exist"),
        (["eval", "all-MiniLM-L6-v2", "not-a-dataset"], "unknown dataset 'not-a-dataset'"),
        (["eval", "no-such-model", "TOY"], "unknown model 'no-such-model'"),
        (["eval", "all-MiniLM-L6-v2", "TOY", "--split", "train"], "no qrels for split 'train'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, toy_beir, args, message):
    args = [str(toy_beir) if a == "TOY" else a for a in args]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]  # exactly one line carries the whole error


def test_console_script_exit_code(toy_beir):
    """The installed `prod-st` script itself: usage errors and bad input both exit 2, without tracebacks."""
    proc = subprocess.run(
        [sys.executable, "-m", "prod_st_cli.main", "eval", "all-MiniLM-L6-v2", str(toy_beir / "nope")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: dataset folder")


def test_eval_beir_prints_one_table_with_average(monkeypatch, capsys, toy_beir, tmp_path):
    from conftest import TOY_CORPUS, TOY_QRELS, TOY_QUERIES, write_beir

    second = write_beir(tmp_path / "second", TOY_CORPUS, TOY_QUERIES, {"q3": TOY_QRELS["q3"]})
    output = tmp_path / "beir.json"
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", "--beir", f"{toy_beir},{second}", "--output", str(output)
    )
    assert code == 0, err
    assert "zero-shot BEIR" in out and "average" in out
    results = json.loads(output.read_text())["beir"]
    assert set(results) == {str(toy_beir), str(second), "average"}
    ndcg = [results[str(toy_beir)]["nDCG@10"], results[str(second)]["nDCG@10"]]
    assert results["average"]["nDCG@10"] == pytest.approx(sum(ndcg) / 2)


def test_eval_needs_data_or_beir(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2")
    assert code == 2 and "give either DATA or --beir" in err


@pytest.mark.parametrize("option", ["--top-k", "--batch-size", "--max-queries", "--relevance-level",
                                    "--index-train-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_counts_below_one_are_usage_errors(monkeypatch, capsys, toy_beir, option, value):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), option, value)
    assert code == 2 and "Traceback" not in out + err
    assert option in err and "greater than or equal to 1" in " ".join(err.replace("│", " ").split())


def test_eval_output_is_checked_before_the_work(monkeypatch, capsys, toy_beir, tmp_path):
    import prod_st.util.models

    monkeypatch.setattr(prod_st.util.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    (tmp_path / "a-file").write_text("")
    for output, message in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "m.json", "a-file is a file")):
        code, _, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), "--output", str(output))
        assert code == 2 and message in err and "Traceback" not in err


def test_eval_output_is_written_atomically(monkeypatch, capsys, toy_beir, tmp_path):
    import os

    output = tmp_path / "metrics.json"
    output.write_text("earlier metrics\n")

    replace = os.replace

    def fail(src, dst, *args, **kwargs):  # only the output file's write fails (the corpus cache writes too)
        if os.fspath(dst) == os.fspath(output):
            raise OSError(28, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", fail)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir), "--output", str(output))
    assert code == 4 and f"no space left on the device writing {output}" in err  # a full disk: exit 4
    assert "nDCG@10" in out  # the metrics were printed before the write failed
    assert output.read_text() == "earlier metrics\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "toy"]  # no temporary file left


def test_eval_beir_keeps_the_sets_that_finished(monkeypatch, capsys, toy_beir, tmp_path):
    """--beir a,b with b failing: a's row is printed and written, then b's one-line error, exit 2."""
    from conftest import TOY_CORPUS, TOY_QUERIES, write_beir

    small = write_beir(tmp_path / "small", dict(list(TOY_CORPUS.items())[:3]), TOY_QUERIES, {"q1": {"d1": 1}})
    output = tmp_path / "beir.json"
    code, out, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", "--beir", f"{toy_beir},{small}",
                             "--index", "IVF4,Flat", "--output", str(output))
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"BEIR set '{small}'" in errors[0] and f"written to {output}" in errors[0]
    assert "1 of 2 sets, no average" in out and "│ average" not in out
    assert len(re.findall(r"\d\.\d{4}", out)) == 3  # one row: nDCG@10, MRR@10, R@100 of the finished set
    saved = json.loads(output.read_text())
    assert list(saved["beir"]) == [str(toy_beir)] and saved["complete"] is False
    assert saved["not_evaluated"] == [str(small)] and 0 < saved["beir"][str(toy_beir)]["MRR@10"] <= 1


@pytest.mark.parametrize("beir", [",,", " , "])
def test_eval_beir_without_names_is_refused(monkeypatch, capsys, beir):
    code, _, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", "--beir", beir)
    assert code == 2 and "names no dataset" in err


def test_student_refuses_a_folder_with_files(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Only a new or empty folder: not someone's files, not an existing model (BASE itself, say)."""
    import prod_st.util.models

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("")
    load = prod_st.util.models.load_model
    monkeypatch.setattr(prod_st.util.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    for out, message in ((mine, "exists and is not empty"), (Path(tiny_model_dir), "exists and is not empty"),
                         (tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "s", "a-file is a file")):
        code, _, err = run_cli(monkeypatch, capsys, "student", tiny_model_dir, str(out), "--layers", "1")
        assert code == 2 and message in err and "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    monkeypatch.setattr(prod_st.util.models, "load_model", load)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "student", tiny_model_dir, str(empty), "--layers", "1")
    assert code == 0, err
    assert json.loads((empty / "config.json").read_text())["num_hidden_layers"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


# ---- prod-st run: answer-only test data, Ctrl-C ----

NQ = __import__("conftest").FIXTURES / "dpr-nq"


def finished_run(run_dir, recipe, final: dict, dev: dict) -> None:
    """A run folder as a finished `prod-st run` of `recipe` leaves it (fingerprints, records, final.json)."""
    from prod_st.run import run_folder
    from prod_st.runner import Runner

    Runner(recipe, run_dir).prepare_folder()
    plan = run_folder.plan(recipe)
    for index, name in enumerate(plan.steps):
        folder = run_dir / name
        (folder / "student").mkdir(parents=True)
        (folder / "student" / "modules.json").write_text("[]")
        (folder / run_folder.FINGERPRINT).write_text(plan.steps[name])
        record = {"index": index, "name": name.split("-", 1)[1], "kind": "distill", "teacher": "ce",
                  "student_dev": dev, "teacher_dev": dev, "teacher_measured_as": "retriever", "seconds": {"train": 1.0}}
        (folder / "metrics.json").write_text(json.dumps(record))
        (folder / "DONE").write_text("")
    (run_dir / "final.json").write_text(json.dumps(final | {"fingerprint": plan.final}))


def test_answer_only_test_metrics_in_every_table(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """DPR's NQ test split has answers and no qrels: its metrics are Acc@5/20/100 only. `prod-st run` on the
    finished run, report.md and the model card show those, headed by eval.metric (Acc@20), with no KeyError."""
    import yaml
    from sentence_transformers import SentenceTransformer
    from test_runner import tiny_recipe

    from prod_st.data import load_retrieval_data
    from prod_st.recipe import load_recipe
    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.run.report import load_records, render_prod_section

    metrics = evaluate_model(SentenceTransformer(tiny_model_dir), load_retrieval_data(NQ, "test"), top_k=100).metrics
    assert set(metrics) == {"Acc@5", "Acc@20", "Acc@100"}
    dev = evaluate_model(SentenceTransformer(tiny_model_dir), load_retrieval_data(NQ, "dev"), top_k=100).metrics
    assert {"nDCG@10", "Acc@20"} <= set(dev)  # NQ dev: positives (qrels) and answers
    final = {"recipe": "tiny", "beir": {}, "num_test_queries": 3, "num_docs": 8, "seconds": {"run": 1.0},
             "test": {"student": metrics, "student_before_training": metrics,
                      "teachers": {"ce": {"as": "reranker of the student's top 5", **metrics}}}}
    recipe = tiny_recipe(tiny_model_dir)
    recipe["eval"]["metric"] = "Acc@20"
    path = tmp_path / "nq.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = tmp_path / "run"
    finished_run(run_dir, load_recipe(path), final, dev)

    code, out, err = run_cli(monkeypatch, capsys, "run", str(path), "--output", str(run_dir))
    assert code == 0, err
    header = next(line for line in out.splitlines() if "model" in line and "Acc@" in line)
    columns = [c.strip() for c in header.strip("┃│ ").replace("┃", "│").split("│")]
    assert columns == ["model", "Acc@20", "Acc@5", "Acc@100"]
    assert f"{metrics['Acc@20']:.4f}" in out

    report = (run_dir / "report.md").read_text()
    assert "| model | Acc@20 | Acc@5 | Acc@100 |" in report
    assert "| student Acc@20 | student nDCG@10 |" in report and "teacher Acc@20 (measured as)" in report
    card = render_prod_section(yaml.safe_load((run_dir / "recipe.yaml").read_text()), load_records(run_dir),
                               json.loads((run_dir / "final.json").read_text()))
    assert "| model | Acc@20 | Acc@5 | Acc@100 |" in card
    assert f"| student after PROD | {metrics['Acc@20']:.4f} |" in card


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path, tiny_model_dir):
    """SIGINT to a running `prod-st run`: one line saying how to resume, exit code 130, no traceback."""
    import signal
    import time
    from pathlib import Path

    import yaml
    from prod_st_cli.main import INTERRUPTED
    from test_runner import tiny_recipe

    path = tmp_path / "tiny.yaml"
    recipe = tiny_recipe(tiny_model_dir)
    recipe["stages"][0]["max_steps"] = 2000  # work left when the signal comes, however fast the machine (the
    # tiny recipe's whole run took ~1 s on a fast one, and it ended before SIGINT landed)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    script = Path(sys.executable).with_name("prod-st")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "prod_st_cli.main"]
    env = os.environ | {"PROD_ST_CACHE": str(tmp_path / "cache")}  # an empty cache: the run has real work left
    # As in a terminal: SIGINT at its default. A test run started in the background (`pytest &`, a CI script)
    # inherits SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt in the child.
    proc = subprocess.Popen([*command, "run", str(path), "--output", str(tmp_path / "run")], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Raw reads of the pipe only: communicate() reads the descriptor itself, so anything a buffered reader
    # (`for line in proc.stderr`) had read ahead of the line it stopped at would be lost from `stderr`.
    seen = b""
    deadline = time.monotonic() + 300
    while b"load data: done" not in seen and time.monotonic() < deadline:  # until the run has started its work
        chunk = os.read(proc.stderr.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
    assert b"load data: done" in seen and proc.poll() is None, seen.decode(errors="replace")[-3000:]
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    stderr = (seen + rest).decode()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "Aborted" not in stderr
    assert stderr.strip().splitlines()[-1] == INTERRUPTED
    assert (tmp_path / "run" / "recipe.yaml").is_file()  # nothing of the started run is lost


# ---- recipes, --version, -v after the command, completion, exit codes, validate's imports ----
def test_version(monkeypatch, capsys):
    from prod_st import __version__

    code, out, _ = run_cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"prod-st {__version__}"


def test_recipes_lists_every_embedded_recipe_on_one_line(monkeypatch, capsys):
    from prod_st.recipe import embedded_recipes

    code, out, _ = run_cli(monkeypatch, capsys, "recipes")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == embedded_recipes() and "ablations/prod" in embedded_recipes()
    assert any(line.startswith("quickstart ") and "wordnet-gloss" in line for line in lines)


def test_recipes_show_prints_the_shipped_file(monkeypatch, capsys):
    from prod_st.recipe import embedded_recipe_file

    for name in ("quickstart", "ablations/prod"):
        code, out, _ = run_cli(monkeypatch, capsys, "recipes", "show", name)
        assert code == 0 and out == embedded_recipe_file(name).read_text()
    code, out, err = run_cli(monkeypatch, capsys, "recipes", "show", "nope")
    assert code == 2 and err.strip().startswith("error: no embedded recipe 'nope' (embedded: ")


def test_validate_takes_set_and_verbose_after_the_command(monkeypatch, capsys):
    import logging

    root = logging.getLogger()
    level = root.level
    try:
        code, out, err = run_cli(monkeypatch, capsys, "validate", "quickstart", "--set", "stages.1.lr=3e-5", "-v")
        assert code == 0 and "quickstart: valid" in out, err
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "quickstart", "--set", "stages.9.lr=3e-5")
    assert code == 2 and "stages.9: stages is a list with 4 entries" in err


SHIPPED = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))  # this checkout's recipes


def test_every_shipped_recipe_passes_validate_schema_only_on_a_fresh_machine(monkeypatch, capsys, tmp_path):
    """No data/ or runs/ folder, an empty Hugging Face cache: --schema-only still checks (and passes) every shipped
    recipe, while the full check reports what is not here, with where the data comes from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, out, err = run_cli(monkeypatch, capsys, "validate", "--schema-only", *map(str, SHIPPED))
    assert code == 0, err
    assert [line.split(": schema valid (")[0] for line in out.splitlines()] == list(map(str, SHIPPED))
    doc = next(p for p in SHIPPED if p.stem == "msmarco-doc")
    code, out, err = run_cli(monkeypatch, capsys, "validate", str(doc))
    assert code == 2 and len(err.splitlines()) == 1
    assert "dataset folder 'data/msmarco-doc' does not exist" in err
    assert "(where the data comes from: MS MARCO document ranking's original release files, from " \
           "https://microsoft.github.io/msmarco/" in err
    code, out, err = run_cli(monkeypatch, capsys, "validate", "--schema-only", str(doc), "--set", "stages.0.lr=-1")
    assert code == 2 and "stages.0.lr: Input should be greater than 0" in err  # the schema is still checked


def test_shipped_recipes_that_read_a_local_folder_say_where_its_data_comes_from():
    from prod_st.recipe import data_origin, load_recipe

    for path in SHIPPED:
        dataset = load_recipe(path).data.dataset
        if "/" in dataset:  # a folder (BEIR names download themselves; wordnet-gloss is embedded)
            assert "http" in (data_origin(path) or "") or "github.com" in (data_origin(path) or ""), path.name


@pytest.mark.parametrize("args, shown", [
    (["validate", "data/[x].yaml"], "recipe file not found: data/[x].yaml"),
    (["validate", "QUICKSTART", "--set", "data.dataset=data/[x]"], "dataset folder 'data/[x]' does not exist"),
    (["validate", "QUICKSTART", "--set", "data.dataset=[bold]x[/bold]"], "--set 'data.dataset=[bold]x[/bold]': the "),
    (["eval", "all-MiniLM-L6-v2", "/no/[red]folder"], "dataset folder '/no/[red]folder' does not exist"),
])
def test_error_lines_print_paths_and_values_verbatim(monkeypatch, capsys, args, shown):
    """rich must not read `[x]` in a path or a --set value as markup (it would drop it from the message)."""
    quickstart = str(next(p for p in SHIPPED if p.stem == "quickstart"))
    code, out, err = run_cli(monkeypatch, capsys, *[quickstart if a == "QUICKSTART" else a for a in args])
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert shown in err, err


def test_validate_prints_a_recipe_path_verbatim(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "[x]"
    folder.mkdir()
    (folder / "quickstart.yaml").write_text(next(p for p in SHIPPED if p.stem == "quickstart").read_text())
    code, out, err = run_cli(monkeypatch, capsys, "validate", "--schema-only", str(folder / "quickstart.yaml"))
    assert code == 0 and out.startswith(f"{folder / 'quickstart.yaml'}: schema valid"), out


def test_data_errors_exit_3(monkeypatch, capsys, toy_beir):
    (toy_beir / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\nnot json\n')
    code, out, err = run_cli(monkeypatch, capsys, "eval", "all-MiniLM-L6-v2", str(toy_beir))
    assert code == 3 and "corpus.jsonl:2: malformed JSON" in err and "Traceback" not in err + out


def _script() -> list[str] | None:
    script = Path(sys.executable).with_name("prod-st")
    return [str(script)] if script.exists() else None


def test_shell_completion_is_on():
    import os

    if _script() is None:
        pytest.skip("no installed prod-st script")
    env = {**os.environ, "_PROD_ST_COMPLETE": "complete_bash", "COMP_WORDS": "prod-st rec", "COMP_CWORD": "1"}
    proc = subprocess.run(_script(), capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["recipes"]


def test_validate_imports_no_torch_datasets_or_sentence_transformers(tmp_path, toy_beir):
    """`prod-st validate` reads YAML and a few small files: the heavy libraries stay unimported (it takes a
    fraction of a second). A BEIR folder recipe exercises the data checks too."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ndata: {{dataset: {toy_beir}, train_split: null, dev_split: null}}\n"
                      "student: {init: all-MiniLM-L6-v2}\nstages: []\n")
    code = (
        "import sys\nfrom prod_st_cli.main import main\n"
        f"sys.argv = ['prod-st', 'validate', 'quickstart', {str(recipe)!r}, '--set', 'training.precision=bf16']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'datasets', 'sentence_transformers', 'transformers', 'pyarrow', 'faiss')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quickstart: valid" in proc.stdout and "r.yaml: valid (evaluate only)" in " ".join(proc.stdout.split())
    assert proc.stdout.strip().splitlines()[-1] == "[]"
