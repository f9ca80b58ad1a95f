"""The `prod-st` command line: one-line errors with exit code 2, the eval table and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

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
