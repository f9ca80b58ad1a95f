"""The run folder's rules (prod_st.run.run_folder), without training anything: which folders prod-st may use and
clear, the step fingerprints, and what a changed recipe or a damaged file invalidates."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest
from test_runner import tiny_recipe

from prod_st.recipe import parse_recipe
from prod_st.run import run_folder
from prod_st.runner import Runner
from prod_st.util.errors import ProdStError

STEPS = ["00-init", "01-warmup", "02-bi", "03-ce", "04-dpd-1"]


def recipe(change=None, model: str = "all-MiniLM-L6-v2"):
    data = tiny_recipe(model)
    if change:
        change(data)
    return parse_recipe(data)


def changed_steps(change) -> tuple[list[str], bool]:
    """(step folders whose fingerprint changes, whether the final step's changes)."""
    before, after = run_folder.plan(recipe()), run_folder.plan(recipe(change))
    return [s for s in before.steps if before.steps[s] != after.steps.get(s)], before.final != after.final


# ---- fingerprints: what each step depends on ----

@pytest.mark.parametrize(
    "change, steps, final",
    [
        (lambda r: r["eval"].update(beir=["scifact"]), [], True),  # only the final evaluation
        (lambda r: r["eval"].update(metric="MRR@10"), [], False),  # the tables' first column: nothing to redo
        (lambda r: r["eval"].update(batch_size=7), [], False),  # speed, not numbers
        (lambda r: r.update(publish={"repo_id": "me/x"}), [], False),  # only the publication
        (lambda r: r.update(output={"dir": "elsewhere"}), [], False),
        (lambda r: r["stages"][2].update(lr=1e-3), STEPS[3:], True),  # a stage and every later step
        (lambda r: r["teachers"]["ce"].update(batch_size=3), STEPS[3:], True),  # from the first stage using it
        (lambda r: r["teachers"]["bi"]["train"].update(lr=1e-3), STEPS[2:], True),  # and ce, taught on its negatives
        (lambda r: r["dpd"].update(lr=1e-6), STEPS[4:], True),
        (lambda r: r["dpd"].update(rounds=2), [], True),  # a second round keeps the first
        (lambda r: r["eval"].update(top_k=50), STEPS, True),  # dev metrics of every step
        (lambda r: r["student"].update(num_layers=2), STEPS, True),
        (lambda r: r["student"].update(max_query_length=8), STEPS, True),  # every step reads queries
        (lambda r: r["data"].update(train_queries=20), STEPS, True),
        (lambda r: r.update(seed=4), STEPS, True),
    ],
)
def test_a_change_reaches_the_steps_that_depend_on_it(change, steps, final):
    assert changed_steps(change) == (steps, final)


def test_more_dpd_rounds_add_steps_and_fewer_drop_them():
    two = run_folder.plan(recipe(lambda r: r["dpd"].update(rounds=2)))
    assert list(two.steps) == STEPS + ["05-dpd-2"]
    assert two.steps["04-dpd-1"] == run_folder.plan(recipe()).steps["04-dpd-1"]


def test_a_teacher_mining_with_the_student_depends_on_the_student_before_its_first_use():
    def student_mines(r):
        r["teachers"]["ce"]["train"]["negatives_from"] = "student"

    plain = run_folder.plan(recipe(student_mines))
    warmup_changed = run_folder.plan(recipe(lambda r: (student_mines(r), r["stages"][0].update(lr=1e-3))))
    assert plain.teachers["ce"] != warmup_changed.teachers["ce"]
    assert plain.teachers["bi"] == warmup_changed.teachers["bi"]


def test_the_number_of_processes_reaches_every_training_step_and_trained_teacher(monkeypatch):
    """Under torchrun a step reads batch_size x processes rows: a 2-process run trains on other data than a
    1-process one, so its training steps (and teachers trained in the run) have other fingerprints; the untrained
    student's does not move, and a 1-process run keeps the fingerprints it had before processes were counted."""
    one = run_folder.plan(recipe())
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets (no process group here: the environment counts)
    two = run_folder.plan(recipe())
    assert [s for s in one.steps if one.steps[s] != two.steps[s]] == STEPS[1:]
    assert one.teachers != two.teachers
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert run_folder.plan(recipe()) == one


def test_a_run_resumed_on_another_number_of_processes_says_why_it_redoes_its_steps(tmp_path, caplog, monkeypatch):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    fake_steps(run, run_folder.plan(recipe()), STEPS)
    fake_final(run, run_folder.plan(recipe()))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="prod_st.run"):
        Runner(recipe(), run).prepare_folder()
    lines = [r.getMessage() for r in caplog.records if "processes changed" in r.getMessage()]
    assert lines == ["the number of processes changed (1 -> 2; a step reads batch_size x processes rows): redoing "
                     "01-warmup, 02-bi, 03-ce, 04-dpd-1, final; keeping 00-init"]
    assert run_folder.marker(run)["processes"] == 2


# ---- which folders prod-st uses, and what --force removes ----

def test_protected_folders_are_never_a_run_folder(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(work / "sub")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for folder, why in [(Path("."), "is the working directory"), (work, "contains the working directory"),
                        (Path("/"), "contains the working directory"), (tmp_path / "home", "is your home folder")]:
        for force in (False, True):
            with pytest.raises(ProdStError, match=why):
                run_folder.check_folder(folder, "tiny", force=force)


def test_folders_that_are_not_prod_st_runs_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProdStError, match="exists and is not a folder"):
        run_folder.check_folder(tmp_path / "file", "tiny", force=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(ProdStError, match="not a prod-st run folder"):
            run_folder.check_folder(mine, "tiny", force=force)
    (mine / "recipe.yaml").write_text("name: tiny\n")  # a run from before the marker
    with pytest.raises(ProdStError, match="older prod-st"):
        run_folder.check_folder(mine, "tiny", force=True)
    (mine / "recipe.yaml").write_text("name: other\n")
    with pytest.raises(ProdStError, match="holds a run of a different recipe"):
        run_folder.check_folder(mine, "tiny", force=True)
    assert not run_folder.check_folder(tmp_path / "new", "tiny", force=True)
    (tmp_path / "empty").mkdir()
    assert not run_folder.check_folder(tmp_path / "empty", "tiny", force=False)


def test_force_removes_only_prod_st_entries(tmp_path):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    for name in ["00-init", "03-ce", "teachers/bi/model", "student", "hub-upload", ".final.json.tmp12"]:
        (run / name).mkdir(parents=True, exist_ok=True)
    for name in ["final.json", "report.md", "report.png", "notes.txt", "01-my-notes.txt", "data.csv"]:
        (run / name).write_text("x")
    (run / "my-data").mkdir()
    Runner(recipe(), run, force=True).prepare_folder()
    left = sorted(p.name for p in run.iterdir())
    # prod-st's own entries are gone (the marker, recipe.yaml and teacher folders are made again at once)
    assert left == sorted([run_folder.MARKER, run_folder.RUN_LOCK, "recipe.yaml", "teachers", "notes.txt", "01-my-notes.txt",
                           "data.csv", "my-data"])
    assert sorted(p.name for p in (run / "teachers").iterdir()) == ["bi", "ce"]
    for name in ("bi", "ce"):  # only their fingerprint, nothing of the earlier run
        assert [p.name for p in (run / "teachers" / name).iterdir()] == [run_folder.FINGERPRINT]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_that_cannot_be_written_fails_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ProdStError, match="cannot write the run folder"):
            Runner(recipe(), folder).prepare_folder()
    finally:
        folder.chmod(0o755)


def test_a_run_folder_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ProdStError, match="cannot write the run folder"):
        Runner(recipe(), tmp_path / "afile" / "run").prepare_folder()


# ---- a changed recipe, damaged files ----

def fake_steps(run: Path, plan: run_folder.Plan, names: list[str], *, done: bool = True) -> None:
    """Step folders as a run leaves them (fingerprint, metrics.json, student/, DONE)."""
    for i, name in enumerate(names):
        folder = run / name
        (folder / "student").mkdir(parents=True, exist_ok=True)
        (folder / run_folder.FINGERPRINT).write_text(plan.steps[name] + "\n")
        (folder / "student" / "modules.json").write_text("[]")
        (folder / "metrics.json").write_text(json.dumps({"index": i, "name": name, "kind": "x"}))
        if done:
            (folder / "DONE").write_text("")


def fake_final(run: Path, plan: run_folder.Plan) -> None:
    (run / "final.json").write_text(json.dumps({"fingerprint": plan.final, "test": {}}))
    (run / "student").mkdir()
    (run / "report.md").write_text("report")


def test_a_run_that_failed_before_its_first_step_finished_takes_a_corrected_recipe(tmp_path):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    (run / "00-init").mkdir()
    (run / "00-init" / run_folder.FINGERPRINT).write_text(run_folder.plan(recipe()).steps["00-init"])
    fixed = recipe(lambda r: r["student"].update(num_layers=2))
    Runner(fixed, run).prepare_folder()  # no "different recipe" refusal
    assert not (run / "00-init").exists()
    assert (run / "recipe.yaml").read_text() == fixed.resolved_yaml()


def test_a_changed_stage_redoes_it_and_every_later_step(tmp_path, caplog):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    fake_steps(run, run_folder.plan(recipe()), STEPS)
    fake_final(run, run_folder.plan(recipe()))
    (run / "notes.txt").write_text("mine")
    changed = recipe(lambda r: r["stages"][2].update(lr=1e-3))
    with caplog.at_level(logging.INFO, logger="prod_st.run"):
        Runner(changed, run).prepare_folder()
    assert sorted(p.name for p in run.iterdir() if p.name[:2].isdigit()) == STEPS[:3]
    assert not (run / "final.json").exists() and not (run / "student").exists() and not (run / "report.md").exists()
    assert (run / "notes.txt").read_text() == "mine"
    lines = [r.getMessage() for r in caplog.records if "recipe changed" in r.getMessage()]
    assert lines == ["recipe changed (stages.2.lr): redoing 03-ce, 04-dpd-1, final; keeping 00-init, 01-warmup, 02-bi"]


def test_changing_only_beir_or_publish_of_a_finished_run_redoes_only_the_end(tmp_path, caplog):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    plan = run_folder.plan(recipe())
    fake_steps(run, plan, STEPS)
    fake_final(run, plan)
    publish = recipe(lambda r: r.update(publish={"repo_id": "me/x", "dry_run": True}))
    with caplog.at_level(logging.INFO, logger="prod_st.run"):
        Runner(publish, run).prepare_folder()
    assert (run / "final.json").exists()  # the final evaluation holds; only the publication is to do
    assert "redoing publish; keeping 00-init" in caplog.text
    beir = recipe(lambda r: r["eval"].update(beir=["scifact"]))
    Runner(beir, run).prepare_folder()
    assert sorted(p.name for p in run.iterdir() if p.name[:2].isdigit()) == STEPS
    assert not (run / "final.json").exists()


def test_a_killed_step_is_kept_for_resume_and_later_ones_go(tmp_path):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    plan = run_folder.plan(recipe())
    fake_steps(run, plan, STEPS[:2])
    fake_steps(run, plan, ["02-bi"], done=False)
    (run / "02-bi" / "checkpoints").mkdir()
    (run / "03-ce").mkdir()  # cannot be valid after an unfinished step
    Runner(recipe(), run).prepare_folder()
    assert (run / "02-bi" / "checkpoints").is_dir() and not (run / "03-ce").exists()


@pytest.mark.parametrize("damage", ["", '{"index": 3, "na'])
def test_a_damaged_metrics_json_redoes_the_step_with_a_warning(tmp_path, caplog, damage):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    plan = run_folder.plan(recipe())
    fake_steps(run, plan, STEPS)
    fake_final(run, plan)
    (run / "02-bi" / "metrics.json").write_text(damage)
    with caplog.at_level(logging.WARNING, logger="prod_st.run"):
        Runner(recipe(), run).prepare_folder()
    assert sorted(p.name for p in run.iterdir() if p.name[:2].isdigit()) == STEPS[:2]
    assert "02-bi: its metrics.json is missing, empty or truncated: redoing it" in caplog.text


@pytest.mark.parametrize("damage", ["", '{"recipe": "tiny", "fing'])
def test_a_damaged_final_json_redoes_the_final_step_with_a_warning(tmp_path, caplog, damage):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    plan = run_folder.plan(recipe())
    fake_steps(run, plan, STEPS)
    fake_final(run, plan)
    (run / "final.json").write_text(damage)
    with caplog.at_level(logging.WARNING, logger="prod_st.run"):
        Runner(recipe(), run).prepare_folder()
    assert sorted(p.name for p in run.iterdir() if p.name[:2].isdigit()) == STEPS
    assert not (run / "final.json").exists()
    assert "final.json is empty or truncated: redoing the final evaluation" in caplog.text


def test_a_changed_teacher_folder_is_made_again(tmp_path):
    run = tmp_path / "run"
    Runner(recipe(), run).prepare_folder()
    (run / "teachers" / "ce" / "model").mkdir(parents=True)
    (run / "teachers" / "bi" / "model").mkdir(parents=True)
    Runner(recipe(lambda r: r["teachers"]["ce"]["train"].update(lr=1e-3)), run).prepare_folder()
    assert not (run / "teachers" / "ce" / "model").exists() and (run / "teachers" / "bi" / "model").exists()


def test_recipe_changes_names_the_fields():
    old = recipe().model_dump(mode="json")
    new = copy.deepcopy(old)
    new["stages"][1]["negatives"]["count"] = 2
    new["eval"]["beir"] = ["scifact"]
    assert run_folder.recipe_changes(old, new) == ["stages.1.negatives.count", "eval.beir"]


def test_a_run_of_another_recipe_is_replaced_only_with_force(tmp_path):
    run = tmp_path / "run"
    other = recipe(lambda r: r.update(name="other"))
    Runner(other, run).prepare_folder()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ProdStError, match="holds a run of a different recipe .*--force to replace that run"):
        Runner(recipe(), run).prepare_folder()
    Runner(recipe(), run, force=True).prepare_folder()
    assert (run / "recipe.yaml").read_text() == recipe().resolved_yaml()
    assert (run / "notes.txt").read_text() == "mine"


def test_an_ensemble_teacher_depends_on_its_members():
    def with_ensemble(r, ce_lr=None):
        r["teachers"]["ens"] = {"kind": "ensemble", "members": {"bi": 0.5, "ce": 0.5}}
        r["dpd"]["teacher"] = "ens"
        if ce_lr:
            r["teachers"]["ce"]["train"]["lr"] = ce_lr

    plain = run_folder.plan(recipe(with_ensemble))
    assert "ens" in plain.teachers and plain.steps["04-dpd-1"] != run_folder.plan(recipe()).steps["04-dpd-1"]
    changed = run_folder.plan(recipe(lambda r: with_ensemble(r, ce_lr=1e-3)))
    assert plain.teachers["ens"] != changed.teachers["ens"] and plain.teachers["bi"] == changed.teachers["bi"]
    reweighted = run_folder.plan(recipe(lambda r: (with_ensemble(r), r["teachers"]["ens"]["members"].update(bi=0.3))))
    assert reweighted.teachers["ens"] != plain.teachers["ens"]
    assert [s for s in STEPS if reweighted.steps[s] != plain.steps[s]] == ["04-dpd-1"]
