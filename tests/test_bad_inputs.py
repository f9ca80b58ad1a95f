"""Every bad input a user can give, through the installed `prod-st` console script: exit code 2, exactly one
`error:` line on stderr (the last one), no traceback, and no file outside the run folder changed.

One row per case: (id, args, message). In `args`, these placeholders are replaced before the run:
TOY (a good BEIR folder), MODEL (a tiny SentenceTransformer folder), RECIPE (a good tiny recipe file), RUN
(the run folder, the only place a command may write), TMP (the test's scratch folder). A row's `setup`
(optional) prepares TMP before the command runs and returns nothing. `bench/bad_inputs.py` prints this
table with the real messages for bench/RESULTS.md.
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


def check_one_line_error(proc: subprocess.CompletedProcess, message: str) -> str:
    """Exit 2, no traceback, exactly one `error:` line, and it is the last line of stderr; returns it."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
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

# (id, args, message[, setup(tmp)])
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
]


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
    _, args, message, *setup = case
    if setup:
        setup[0](tmp_path)
    before = snapshot(tmp_path, skip=(tmp_path / "run",))
    shown = fill(args, places)
    proc = run_script(shown, cwd=tmp_path)
    error = check_one_line_error(proc, message)
    assert snapshot(tmp_path, skip=(tmp_path / "run",)) == before
    if os.environ.get("PROD_ST_BAD_INPUTS_TABLE"):  # bench/bad_inputs.py collects the table for RESULTS.md
        record = {"id": case[0], "args": args, "exit": proc.returncode, "error": error.replace(str(tmp_path), "TMP")}
        with open(os.environ["PROD_ST_BAD_INPUTS_TABLE"], "a") as f:
            f.write(json.dumps(record) + "\n")
