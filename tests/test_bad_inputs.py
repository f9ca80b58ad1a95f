"""Every bad input a user can give, through the installed `prod-st` console script: exit code 2 (3 for a data
file that exists but cannot be used: DATA_ERRORS), exactly one `error:` line on stderr (the last one), no
traceback, and no file outside the run folder changed.

One row per case: (id, args, message). In `args`, these placeholders are replaced before the run:
TOY (a good BEIR folder), MODEL (a tiny SentenceTransformer folder), RECIPE (a good tiny recipe file), RUN
(the run folder, the only place a command may write), TMP (the test's scratch folder). A row's `setup`
(optional) prepares TMP before the command runs and returns nothing; its `env` (optional, after `setup`, which
may then be None) sets environment variables for the command, with the same placeholders.
`bench/bad_inputs.py` prints this table with the real messages for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("prod-st")


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `root`, except under `skip`."""
    found = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip) or not path.is_file():
            continue
        stat = path.stat()
        found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def run_script(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "prod_st_cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def check_one_line_error(proc: subprocess.CompletedProcess, message: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `error:` line, and it is the last line of stderr; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    return errors[0]


def recipe_setup(change):
    """A setup that writes TMP/r.yaml: test_runner's tiny recipe (on the packaged MiniLM, 6 layers), changed."""
    def setup(tmp: Path) -> None:
        import yaml
        from test_runner import tiny_recipe

        recipe = tiny_recipe("all-MiniLM-L6-v2")
        change(recipe)
        (tmp / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return setup


def evaluate_only(recipe: dict) -> None:
    """An evaluate-only recipe (as trec-dl19-passage.yaml) of a run that never ran (TMP is the working folder)."""
    recipe |= {"stages": [], "teachers": {}, "dpd": None}
    recipe["data"] |= {"train_split": None, "dev_split": None}
    recipe["student"] = {"init": "runs/msmarco-passage/student"}


VALIDATE, RUN = ["validate", "TMP/r.yaml"], ["run", "TMP/r.yaml", "--output", "RUN"]
MORE_LAYERS = recipe_setup(lambda r: r["student"].update(num_layers=7))
NO_BACKBONE = recipe_setup(lambda r: r["teachers"]["bi"]["train"].update(backbone="./models/bi-base"))
NO_SPLIT = recipe_setup(lambda r: r["data"].update(dev_split="validation"))
NOT_RUN_YET = recipe_setup(evaluate_only)

def bad_beir(name: str, text: str | bytes):
    """A setup: TMP/bad, the toy BEIR folder with file `name` (relative to it) replaced by `text`."""
    def setup(tmp: Path) -> None:
        from conftest import TOY_CORPUS, TOY_QRELS, TOY_QUERIES, write_beir

        folder = write_beir(tmp / "bad", TOY_CORPUS, TOY_QUERIES, TOY_QRELS)
        data = text if isinstance(text, bytes) else text.encode()
        (folder / name).write_bytes(data)
    return setup


def append_line(name: str, line: bytes):
    """A setup: TMP/bad, the toy BEIR folder with `line` appended to file `name`."""
    def setup(tmp: Path) -> None:
        from conftest import TOY_CORPUS, TOY_QRELS, TOY_QUERIES, write_beir

        folder = write_beir(tmp / "bad", TOY_CORPUS, TOY_QUERIES, TOY_QRELS)
        with open(folder / name, "ab") as f:
            f.write(line + b"\n")
    return setup


def a_file(tmp: Path) -> None:
    (tmp / "a-file").write_text("not a folder\n")


def small_beir(tmp: Path) -> None:
    """TMP/small: three documents, too few for an IVF4 index (the toy folder has six)."""
    from conftest import TOY_CORPUS, TOY_QUERIES, write_beir

    write_beir(tmp / "small", dict(list(TOY_CORPUS.items())[:3]), TOY_QUERIES, {"q1": {"d1": 1}})


def run_with_fewer_layers(tmp: Path) -> None:
    """RUN: a finished run whose recipe says 3 student layers while the saved student's config says 2."""
    import json

    from prod_st.recipe import load_recipe

    run = tmp / "run"
    (run / "student").mkdir(parents=True)
    (run / "recipe.yaml").write_text(load_recipe("quickstart").resolved_yaml())  # student.num_layers: 3
    (run / "final.json").write_text("{}\n")
    (run / "student" / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"}]))
    (run / "student" / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))


def tiny_recipe_file(tmp: Path) -> Path:
    """TMP/tiny.yaml: a small valid recipe (the packaged model, so nothing needs the MODEL placeholder)."""
    import yaml
    from test_runner import tiny_recipe

    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe("all-MiniLM-L6-v2"), sort_keys=False))
    return path


def _file_named_afile(tmp: Path) -> None:
    tiny_recipe_file(tmp)
    (tmp / "afile").write_text("not a folder")


def _user_folder(tmp: Path) -> None:
    tiny_recipe_file(tmp)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")


def _run_without_marker(tmp: Path) -> None:
    tiny_recipe_file(tmp)
    (tmp / "old").mkdir()
    (tmp / "old" / "recipe.yaml").write_text("name: tiny\n")


# (id, args, message[, setup(tmp)[, env]])
CASES: list[tuple] = [
    ("eval-missing-folder", ["eval", "MODEL", "TMP/no/such/folder"], "does not exist"),
    # --- checks before work (preflight) and recipes that reuse a run
    ("validate-num-layers-above-depth", VALIDATE, "student.num_layers: 7 is more than the 6 layers", MORE_LAYERS),
    ("run-num-layers-above-depth", RUN, "student.num_layers: 7 is more than the 6 layers", MORE_LAYERS),
    ("validate-missing-teacher-backbone", VALIDATE,
     "teachers.bi.train.backbone: model folder './models/bi-base' does not exist", NO_BACKBONE),
    ("run-missing-teacher-backbone", RUN, "teachers.bi.train.backbone: model folder './models/bi-base'", NO_BACKBONE),
    ("validate-missing-split", VALIDATE, "data.dev_split: ", NO_SPLIT),
    ("run-missing-split", RUN, "no qrels for split 'validation' (available: dev, test, train)", NO_SPLIT),
    ("validate-run-student-not-there-yet", VALIDATE, "run recipes/msmarco-passage.yaml first", NOT_RUN_YET),
    ("run-run-student-not-there-yet", RUN, "student.init: model folder 'runs/msmarco-passage/student' does not "
     "exist yet: run recipes/msmarco-passage.yaml first", NOT_RUN_YET),
    ("validate-teacher-negatives-above-window", VALIDATE, "teachers.bi.train: num_negatives 31 is more than the "
     "miner's top 30 (negatives_window)",
     recipe_setup(lambda r: r["teachers"]["bi"]["train"].update(num_negatives=31))),
    ("run-dpd-negatives-above-rerank-depth", RUN, "dpd: num_negatives (15) must be < rerank_depth (15)",
     recipe_setup(lambda r: r["dpd"].update(num_negatives=15))),
    # --- commands' inputs, outputs and data
    ("eval-empty-corpus", ["eval", "MODEL", "TMP/bad"], "corpus.jsonl: no documents in this file",
     bad_beir("corpus.jsonl", "")),
    ("eval-empty-queries", ["eval", "MODEL", "TMP/bad"], "queries.jsonl: no queries in this file",
     bad_beir("queries.jsonl", "\n")),
    ("eval-qrels-only-header", ["eval", "MODEL", "TMP/bad"], "test.tsv: no relevance judgements in this file",
     bad_beir("qrels/test.tsv", "query-id\tcorpus-id\tscore\n")),
    ("eval-qrels-not-utf8", ["eval", "MODEL", "TMP/bad"], "test.tsv:6: not UTF-8 text (byte 0xff",
     append_line("qrels/test.tsv", b"q1\td\xff\t1")),
    ("eval-corpus-not-utf8", ["eval", "MODEL", "TMP/bad"], "corpus.jsonl:7: not UTF-8 text (byte 0xe9",
     append_line("corpus.jsonl", b'{"_id": "d7", "text": "caf\xe9"}')),
    ("eval-repeated-doc-id", ["eval", "MODEL", "TMP/bad"], "corpus.jsonl: document id 'd2' appears 2 times",
     append_line("corpus.jsonl", b'{"_id": "d2", "text": "a second d2"}')),
    ("eval-repeated-query-id", ["eval", "MODEL", "TMP/bad"], "queries.jsonl: query id 'q1' appears 2 times",
     append_line("queries.jsonl", b'{"_id": "q1", "text": "a second q1"}')),
    ("eval-ivf-too-big", ["eval", "MODEL", "TOY", "--index", "IVF4096,Flat"], "needs at least 4096 vectors"),
    ("eval-torch-search-approximate", ["eval", "MODEL", "TOY", "--search", "torch", "--index", "HNSW32"],
     "--search torch is exact search only (--index Flat or SQfp16), not 'HNSW32'"),
    ("eval-output-is-a-folder", ["eval", "MODEL", "TOY", "--output", "TMP"], "is a folder: give the path of a file"),
    ("eval-output-under-a-file", ["eval", "MODEL", "TOY", "--output", "TMP/a-file/m.json"], "a-file is a file",
     a_file),
    ("eval-cache-is-a-file", ["eval", "MODEL", "TOY"], "a-file is a file, not a folder: set PROD_ST_CACHE", a_file,
     {"PROD_ST_CACHE": "TMP/a-file"}),
    ("eval-beir-no-names", ["eval", "MODEL", "--beir", ",,"], "names no dataset"),
    ("eval-beir-second-set-fails", ["eval", "MODEL", "--beir", "TOY,TMP/small", "--index", "IVF4,Flat"],
     "(the 1 finished set(s) are shown above)", small_beir),
    ("student-out-not-empty", ["student", "MODEL", "TOY", "--layers", "1"], "exists and is not empty"),
    ("student-out-under-a-file", ["student", "MODEL", "TMP/a-file/s", "--layers", "1"], "a-file is a file", a_file),
    ("push-student-fewer-layers", ["push", "RUN", "--repo-id", "me/student", "--dry-run"],
     "has 2 transformer layers but the run's recipe says student.num_layers: 3", run_with_fewer_layers),
    # --- usage errors (option values) are one line too
    ("eval-top-k-0", ["eval", "MODEL", "TOY", "--top-k", "0"], "Invalid value for '--top-k'"),
    ("eval-batch-size-0", ["eval", "MODEL", "TOY", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    ("eval-max-queries-minus-1", ["eval", "MODEL", "TOY", "--max-queries", "-1"], "Invalid value for '--max-queries'"),
    ("eval-relevance-level-0", ["eval", "MODEL", "TOY", "--relevance-level", "0"],
     "Invalid value for '--relevance-level'"),
    ("unknown-option", ["run", "TMP/tiny.yaml", "--bogus"], "No such option: --bogus"),
    ("run-set-unknown-field", ["run", "TMP/tiny.yaml", "--set", "stages.0.lrr=1e-4"],
     "tiny.yaml with --set: stages.0.lrr: unknown key (did you mean 'lr'?)", tiny_recipe_file),
    ("validate-set-no-such-stage", ["validate", "TMP/tiny.yaml", "--set", "stages.9.lr=1e-4"],
     "stages.9: stages is a list with", tiny_recipe_file),
    # --- run folder and resume
    ("run-output-is-a-file", ["run", "TMP/tiny.yaml", "--output", "TMP/afile"], "exists and is not a folder",
     _file_named_afile),
    ("run-output-under-a-file", ["run", "TMP/tiny.yaml", "--output", "TMP/afile/run"], "cannot write the run folder",
     _file_named_afile),
    ("run-force-working-directory", ["run", "TMP/tiny.yaml", "--output", ".", "--force"], "is the working directory",
     tiny_recipe_file),
    ("run-force-folder-not-made-by-prod-st", ["run", "TMP/tiny.yaml", "--output", "TMP/mine", "--force"],
     "not a prod-st run folder", _user_folder),
    ("run-folder-of-an-older-prod-st", ["run", "TMP/tiny.yaml", "--output", "TMP/old"], "older prod-st",
     _run_without_marker),
]


# the cases whose error is a data error (exit 3): the file is there, its contents cannot be used
DATA_ERRORS = {"eval-empty-corpus", "eval-empty-queries", "eval-qrels-only-header", "eval-qrels-not-utf8",
               "eval-corpus-not-utf8", "eval-repeated-doc-id", "eval-repeated-query-id"}


@pytest.fixture
def places(tmp_path, tiny_model_dir, toy_beir):
    return {"TOY": str(toy_beir), "MODEL": tiny_model_dir, "RUN": str(tmp_path / "run"), "TMP": str(tmp_path)}


def fill(args: list[str], places: dict) -> list[str]:
    out = []
    for arg in args:
        for key, value in places.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(case, places, tmp_path):
    _, args, message, *rest = case
    setup, env = (rest + [None, None])[:2]
    if setup:
        setup(tmp_path)
    before = snapshot(tmp_path, skip=(tmp_path / "run",))
    env = {key: fill([value], places)[0] for key, value in (env or {}).items()}
    proc = run_script(fill(args, places), cwd=tmp_path, env=env)
    error = check_one_line_error(proc, message, 3 if case[0] in DATA_ERRORS else 2)
    assert snapshot(tmp_path, skip=(tmp_path / "run",)) == before
    if os.environ.get("PROD_ST_BAD_INPUTS_TABLE"):  # bench/bad_inputs.py collects the table for RESULTS.md
        record = {"id": case[0], "args": args, "exit": proc.returncode, "error": error.replace(str(tmp_path), "TMP")}
        with open(os.environ["PROD_ST_BAD_INPUTS_TABLE"], "a") as f:
            f.write(json.dumps(record) + "\n")
