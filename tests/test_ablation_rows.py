"""bench/ablation.py's rows (issue 20 item 2): every row derived from the PROD base spends the same student steps
of the same batch size, valid as a recipe; the contrastive row mirrors PROD's stages (their lr, fresh mining, no
teacher); (b0) is (b) without the regulariser; a tuning trial scales every student lr; the table keeps each row's
runs at the lr its first seed's trials chose on dev."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import ablation  # noqa: E402

from prod_st.recipe import parse_recipe  # noqa: E402


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(ablation.BASE.read_text())


@pytest.mark.parametrize("row", list(ablation.ROWS))
def test_every_row_spends_the_same_student_steps_and_is_a_valid_recipe(base, row):
    recipe = ablation.derive(base, row)
    assert ablation.student_steps(recipe) == ablation.student_steps(base) == 230
    assert {s["batch_size"] for s in recipe["stages"]} == {16}
    parse_recipe(recipe | {"name": f"row-{row}"}, "test")  # raises on an invalid recipe


def test_the_contrastive_row_mirrors_prods_stages_without_a_teacher(base):
    recipe = ablation.derive(base, "a")
    stages = recipe["stages"]
    assert recipe["teachers"] == {} and recipe["dpd"] is None
    assert all(s["kind"] == "warmup" and "teacher" not in s for s in stages)
    assert [s["lr"] for s in stages] == [s["lr"] for s in base["stages"]] + [base["dpd"]["lr"]]
    assert [s["max_steps"] for s in stages] == [s["max_steps"] for s in base["stages"]] + [base["dpd"]["max_steps"]]
    assert all(s["negatives"]["miner"] == "student" for s in stages)  # re-mined by the current student
    assert [s["negatives"]["count"] for s in stages[1:-1]] == [s["negatives"]["count"] for s in base["stages"][1:]]
    assert stages[-1]["negatives"]["count"] == base["dpd"]["num_negatives"]


def test_b0_is_b_without_the_regulariser(base):
    b, b0 = ablation.derive(base, "b"), ablation.derive(base, "b0")
    assert b["stages"][-1]["teacher"] == b0["stages"][-1]["teacher"] == base["stages"][-1]["teacher"]
    assert b["stages"][-1]["loss"]["reg_weight"] == 1.0 and b0["stages"][-1]["loss"]["reg_weight"] == 0.0
    assert parse_recipe(b0 | {"name": "b0"}, "test").stages[-1].loss.reg_weight == 0.0


def test_a_trial_scales_every_student_lr(base):
    plain, doubled = ablation.derive(base, "e"), ablation.derive(base, "e", 2.0)
    assert [s["lr"] for s in doubled["stages"]] == [2 * s["lr"] for s in plain["stages"]]
    assert doubled["dpd"]["lr"] == 2 * plain["dpd"]["lr"]
    assert base["stages"][0]["lr"] == plain["stages"][0]["lr"]  # the base itself is left alone


def result(row: str, seed: int, scale: float, dev: float, test: float) -> dict:
    return {"row": row, "seed": seed, "lr_scale": scale, "dev": {"01": {"nDCG@10": 0.1}, "02": {"nDCG@10": dev}},
            "test": {"student": {"nDCG@10": test}}}


def test_the_table_keeps_the_runs_at_the_lr_chosen_on_dev_never_on_test():
    runs = [result("c", 1, 0.5, 0.60, 0.90), result("c", 1, 1.0, 0.62, 0.50), result("c", 1, 2.0, 0.61, 0.80),
            result("c", 2, 1.0, 0.63, 0.55), result("c", 2, 2.0, 0.0, 0.0)]
    kept, trials = ablation.chosen(runs)
    assert [(r["seed"], r["lr_scale"]) for r in kept] == [(1, 1.0), (2, 1.0)]
    assert trials["c"] == "x0.5 0.6000 / **x1 0.6200** / x2 0.6100"


FULL = {"nDCG@10": 0.3, "MRR@10": 0.2, "R@100": 0.7}


class FakeRunner:
    """Stands in for prod_st.runner.Runner: a finished run with one stage whose student's dev nDCG@10 is the lr
    scale / 10 (so x8 is chosen) and whose test number is fixed."""

    runs: ClassVar[list[Path]] = []

    def __init__(self, recipe, folder: Path):
        from prod_st.run.run_folder import check_folder

        self.recipe, self.folder = recipe, Path(folder)
        check_folder(self.folder, recipe.name, force=False)  # prod-st's own: an empty folder or its own run

    def run(self) -> dict:
        FakeRunner.runs.append(self.folder)
        scale = round(self.recipe.stages[0].lr / 2e-5, 3)
        stage = self.folder / "01-warmup"
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "metrics.json").write_text(
            '{"student_dev": {"nDCG@10": %f}, "train": {"steps": 230}}' % (scale / 10))
        (self.folder / "student").mkdir(exist_ok=True)
        metrics = {"nDCG@10": 0.5, "MRR@10": 0.4, "R@100": 0.9}
        return {"test": {"student": metrics, "student_before_training": metrics, "teachers": {}},
                "seconds": {"run": 1.0}}


def test_only_the_chosen_trial_is_tested_on_the_full_corpus_and_a_run_without_its_student_is_rerun(
        base, tmp_path, monkeypatch):
    import prod_st.runner

    monkeypatch.setattr(ablation, "OUT", tmp_path)
    monkeypatch.setattr(prod_st.runner, "Runner", FakeRunner)
    monkeypatch.setattr(ablation, "reference_unit", lambda: 1.0)
    monkeypatch.setattr(ablation, "plot", lambda results, path: None)
    full_tested = []
    monkeypatch.setattr(ablation, "full_corpus_metrics",
                        lambda recipe, folder: full_tested.append(folder.name) or dict(FULL))
    assert base["stages"][0]["lr"] == 2e-5  # FakeRunner reads the scale from it
    # x4 was recorded elsewhere (bench/ablation-results/) with another test number and no student folder
    recorded = ablation.run_folder("c", 1, 4.0)
    recorded.mkdir(parents=True)
    (recorded / "ablation.json").write_text('{"row": "c", "seed": 1, "lr_scale": 4.0, "test": {"student": '
                                            '{"nDCG@10": 0.7}}, "dev": {"01": {"nDCG@10": 0.4}}}')
    FakeRunner.runs = []
    assert ablation.main(["--rows", "c", "--seeds", "1,2", "--lr-scales", "1,4,8"]) == 0
    assert full_tested == ["c-kd-bi-x8-s1", "c-kd-bi-x8-s2"]  # not the x1 and x4 trials
    assert [p.name for p in FakeRunner.runs] == ["c-kd-bi-s1", "c-kd-bi-x8-s1", "c-kd-bi-x8-s2"]  # x4 kept
    # asked for the full corpus now, the recorded x4 run has no student: it runs again, and says it differed
    assert ablation.main(["--rows", "c", "--seeds", "1", "--lr-scales", "4"]) == 0
    assert FakeRunner.runs[-1].name == "c-kd-bi-x4-s1"
    rerun = yaml.safe_load((recorded / "ablation.json").read_text())
    assert rerun["rerun_of"] == {"test_nDCG@10": 0.7, "reproduced": False}
    assert rerun["full"] == FULL
    assert rerun["versions"]["torch"] == torch.__version__  # what the numbers were measured with
    assert (tmp_path / "recorded" / "c-kd-bi-x4-s1.json").exists()
