"""Every bad input a user can give, through the installed `prod-st` console script: exit code 2, exactly one
`error:` line on stderr (the last one), no traceback, and no file outside the run folder changed.

One row per case: (id, args, message). In `args`, these placeholders are replaced before the run:
TOY (a good BEIR folder), MODEL (a tiny SentenceTransformer folder), RECIPE (a good tiny recipe file), RUN
(the run folder, the only place a command may write), TMP (the test's scratch folder). A row's `setup`
(optional) prepares TMP before the command runs and returns nothing. `bench/bad_inputs.py` prints this
table with the real messages for bench/RESULTS.md.
"""

from __future__ import annotations

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


# (id, args, message[, setup(tmp)])
CASES: list[tuple] = [
    ("eval-missing-folder", ["eval", "MODEL", "TMP/no/such/folder"], "does not exist"),
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
    proc = run_script(fill(args, places), cwd=tmp_path)
    check_one_line_error(proc, message)
    assert snapshot(tmp_path, skip=(tmp_path / "run",)) == before
