"""The run folder as prod-st owns it: its marker, the entries prod-st creates in it, and which steps a recipe
change invalidates.

- prod-st writes `.prod-st-run` when it creates a run folder. Only a folder with that marker is resumed or
  cleared by `--force`, and `--force` removes only prod-st's own entries (OWN_FILES, OWN_DIRS, NN-<step>/, its
  temp files), never a user's other files. The working directory, its parents, $HOME and / are never a run
  folder.
- Every step (00-init, each stage, each DPD round, the final evaluation, the publication) has a fingerprint:
  a hash of the part of the recipe it depends on (seed, data, student, the dev-evaluation settings, the stage
  specs up to and including its own, the teachers it uses and their specs; the final step adds `eval`, BEIR
  included, and the publication adds `publish`). A step folder stores its fingerprint in FINGERPRINT when the
  step starts, final.json the final step's, the marker the last publication's. On a rerun, the first step whose
  fingerprint differs (or that is missing, or whose own files are unreadable) and every later step are redone,
  earlier ones are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prod_st.util.distributed import world_size
from prod_st.util.errors import ProdStError
from prod_st.util.locks import RUN_LOCK
from prod_st.util.paths import write_text_atomic

logger = logging.getLogger("prod_st.run")

MARKER = ".prod-st-run"
FINGERPRINT = "FINGERPRINT"  # in a step folder and in teachers/<name>/: the fingerprint it was made under
OWN_FILES = ("recipe.yaml", "final.json", "report.md", "report.png", "run.log", MARKER, RUN_LOCK)
OWN_DIRS = ("teachers", "student", "hub-upload")
STEP_DIR = re.compile(r"^\d{2}-[a-z0-9_-]+$")
# atomic writes' temp files (.final.json.tmp123, .hub-upload.tmp-xyz): prod-st's too
TEMP = re.compile(r"^\.(" + "|".join(re.escape(n) for n in OWN_FILES + OWN_DIRS) + r")\.tmp")
# eval settings that do not change a step's results: BEIR is evaluated at the end only; the encoding batch size
# changes speed, not numbers (nor do training.dataloader_num_workers and report_to); `metric` only picks the column the tables lead with and the teacher checks compare
# (the warnings a finished step recorded keep the metric they were written with); `search` (torch or faiss) finds
# the same top-k, ties aside
DEV_EVAL_IGNORED = ("beir", "metric", "batch_size", "search")


def is_own(name: str) -> bool:
    """Whether an entry of a run folder is one prod-st creates (and so may delete)."""
    return name in OWN_FILES or name in OWN_DIRS or bool(STEP_DIR.match(name)) or bool(TEMP.match(name))


def read_json(path: Path):
    """The JSON in `path`, or None when it is missing, empty, truncated or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---- fingerprints ----------------------------------------------------------------------------------------
def _hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Plan:
    """The fingerprint of every step of a recipe, in schedule order."""

    steps: dict[str, str]  # step folder name (00-init, 01-warmup, ..., 05-dpd-1) -> fingerprint
    teachers: dict[str, str]  # teachers the schedule uses -> fingerprint of teachers/<name>/
    final: str
    publish: str | None = None


def plan(recipe) -> Plan:
    """Fingerprints of a recipe's steps. A step's fingerprint contains the previous step's, so a change
    reaches every later step; a teacher's contains the student it was built with when it mines its training
    negatives with the student."""
    r = recipe.model_dump(mode="json")
    r["data"] = data_key(r["data"])
    dev_eval = {k: v for k, v in r["eval"].items() if k not in DEV_EVAL_IGNORED}
    teacher_base = _hash(r["seed"], r["data"], dev_eval)
    teachers: dict[str, str] = {}

    def teacher(name: str, previous: str) -> str:
        """`previous`: the step whose student is current when the schedule first needs this teacher."""
        if name not in teachers:
            spec = r["teachers"][name]
            source = (spec.get("train") or {}).get("negatives_from")
            depends = previous if source == "student" else teacher(source, previous) if source else None
            if spec.get("members"):  # an ensemble is what its members are
                depends = {member: teacher(member, previous) for member in spec["members"]}
            processes = [{"world_size": world_size()}] if spec.get("train") and world_size() > 1 else []
            teachers[name] = _hash("teacher", teacher_base, spec, depends, *processes)
        return teachers[name]

    # training settings that change results (precision, gradient accumulation), only where not the defaults: a
    # recipe without a `training:` block keeps the fingerprints it had before the block existed
    trainer = [training] if (training := recipe.training.results_key()) else []
    # under torchrun a step reads batch_size x processes rows: another number of processes reads other data
    # (a 1-process run keeps the fingerprints it had before this was counted)
    trainer += [{"world_size": world}] if (world := world_size()) > 1 else []
    previous = _hash("init", r["seed"], r["data"], r["student"], dev_eval)
    steps = {"00-init": previous}
    for i, (stage, spec) in enumerate(zip(recipe.stages, r["stages"]), 1):
        used = [stage.teacher, stage.negatives.miner]
        uses = {t: teacher(t, previous) for t in used if t in r["teachers"]}
        previous = steps[f"{i:02d}-{stage.name}"] = _hash("stage", previous, spec, uses, *trainer)
    if recipe.dpd is not None:
        spec = {k: v for k, v in r["dpd"].items() if k not in ("rounds", "negatives")}  # more rounds keep the earlier
        if recipe.dpd.negatives == "sample":  # drawn afresh every epoch since issue 20 (hardest: as before)
            spec["negatives"] = "sample"
        for round_no in range(1, recipe.dpd.rounds + 1):
            uses = {recipe.dpd.teacher: teacher(recipe.dpd.teacher, previous)}
            previous = steps[f"{len(steps):02d}-dpd-{round_no}"] = _hash("dpd", previous, spec, uses, *trainer)
    final_eval = {k: v for k, v in r["eval"].items() if k not in ("metric", "batch_size", "search")}
    final = _hash("final", previous, final_eval)
    return Plan(steps, teachers, final, _hash("publish", final, r["publish"]) if r["publish"] else None)


def data_key(data: dict) -> dict:
    """The recipe's data block as fingerprints count it: with a seeded subset (of queries or corpus), also how the
    subsets are drawn, since issue 20 one RNG per subset (the data of such a run changed; a run on whole splits
    keeps its fingerprints)."""
    subsets = ("train_queries", "dev_queries", "test_queries", "corpus_size")
    return data | {"subsets": "per-split"} if any(data.get(k) is not None for k in subsets) else data


def recipe_changes(old, new, path: str = "") -> list[str]:
    """Dotted paths of the recipe fields that differ (a whole list when its length changed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = dict.fromkeys([*new, *old])
        return [c for k in keys for c in recipe_changes(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in recipe_changes(a, b, f"{path}.{i}")]
    return [] if old == new else [path or "recipe"]


# ---- checks before any work ------------------------------------------------------------------------------
def _protected(folder: Path) -> str | None:
    """Why `folder` can never be a run folder (None if it can)."""
    here = Path.cwd().resolve()
    target = folder.resolve()
    if target == here:
        return "is the working directory"
    if target in here.parents:
        return "contains the working directory"
    if target == Path.home().resolve():
        return "is your home folder"
    if target == Path(target.anchor):
        return "is the file system root"
    return None


def check_folder(folder: Path, recipe_name: str, *, force: bool) -> bool:
    """Refuse, in one line, a run folder prod-st must not use; return whether it holds a prod-st run.

    Read-only: it never creates or changes anything (every rank may call it)."""
    why = _protected(folder)
    if why:
        raise ProdStError(f"the run folder {folder} {why}: a run needs a folder of its own (e.g. runs/{recipe_name}); "
                          "choose another --output")
    if folder.exists() and not folder.is_dir():
        raise ProdStError(f"the run folder {folder} exists and is not a folder: choose another --output")
    if not folder.exists():
        return False
    stored, marked = folder / "recipe.yaml", (folder / MARKER).is_file()
    if stored.is_file():
        try:
            name = (yaml.safe_load(stored.read_text()) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            name = None  # prod-st's own file, unreadable: the fingerprints decide what is kept
        if name is not None and name != recipe_name and not (marked and force):
            how = "--force to replace that run" if marked else "delete that folder yourself to start over"
            raise ProdStError(f"{folder} holds a run of a different recipe ({name!r}, not {recipe_name!r}); use "
                              f"another output.dir (or --output), or {how}")
    if marked:
        return True
    if stored.is_file():
        raise ProdStError(f"{folder} holds a run without prod-st's {MARKER} marker (made by an older prod-st?): "
                          "prod-st cannot tell what it may redo there; use another --output, or delete that folder "
                          "yourself to start over")
    if any(p.name != RUN_LOCK for p in folder.iterdir()):  # (a run killed before its marker leaves only its lock)
        what = "--force deletes only run folders prod-st created" if force else "a run needs a new or empty folder"
        raise ProdStError(f"{folder} is not empty and is not a prod-st run folder (no {MARKER} marker): {what}; "
                          "choose another --output")
    return False


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and write a probe file in it, so a folder that cannot be written fails now,
    not after hours of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".prod-st-probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ProdStError(f"cannot write the run folder {folder}: {e.strerror or e}; choose another --output") from None


# ---- changes to the folder (rank 0) ----------------------------------------------------------------------
def clear(folder: Path) -> list[str]:
    """`--force`: remove prod-st's own entries of a run folder (never anything else); return their names. The
    marker stays (create() rewrites it), so a kill in between still leaves a folder prod-st recognises, and so
    does the lock file this run holds."""
    removed = sorted(p.name for p in folder.iterdir() if is_own(p.name) and p.name not in (MARKER, RUN_LOCK))
    for name in removed:
        _remove(folder / name)
    return removed


def create(folder: Path, recipe_name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, {"created_by": "prod-st", "recipe": recipe_name})


def marker(folder: Path) -> dict:
    found = read_json(folder / MARKER)
    return found if isinstance(found, dict) else {}


def write_marker(folder: Path, payload: dict) -> None:
    write_text_atomic(folder / MARKER, json.dumps(payload, indent=2) + "\n")


def stored_fingerprint(folder: Path) -> str | None:
    try:
        return (folder / FINGERPRINT).read_text().strip() or None
    except OSError:
        return None


def _finished_step_problem(folder: Path) -> str | None:
    """Why a step folder marked DONE cannot be trusted (None if it can)."""
    record = read_json(folder / "metrics.json")
    if not isinstance(record, dict) or not {"index", "name", "kind"} <= set(record):
        return "its metrics.json is missing, empty or truncated"
    if not (folder / "student" / "modules.json").is_file():
        return "its student/ is missing"
    return None


def final_payload(folder: Path, fingerprint: str) -> dict | None:
    """final.json when it is whole and was written for this fingerprint."""
    final = read_json(folder / "final.json")
    if isinstance(final, dict) and final.get("fingerprint") == fingerprint and "test" in final:
        return final
    return None


@dataclass
class Reconciled:
    kept: list[str] = field(default_factory=list)  # finished steps kept as they are
    resumed: str | None = None  # a started step kept for its checkpoints
    redone: list[str] = field(default_factory=list)  # steps (and "final") that will run


def reconcile(folder: Path, recipe, steps: Plan) -> Reconciled:
    """Remove what a changed recipe (or a damaged file) invalidates: the first step that does not match and
    every later one, stale teacher folders, and the final outputs when they are out of date. Logs one line
    saying what changed and what is redone."""
    names = list(steps.steps)
    finished, resumed = 0, None
    for name in names:
        step = folder / name
        if stored_fingerprint(step) != steps.steps[name]:
            break
        if not (step / "DONE").exists():
            resumed = name  # killed while running: resumed from its checkpoints, everything after it redone
            break
        problem = _finished_step_problem(step)
        if problem:
            logger.warning("%s: %s: redoing it and every later step", name, problem)
            break
        finished += 1
    result = Reconciled(kept=names[:finished], resumed=resumed, redone=names[finished:])
    for path in sorted(folder.iterdir()):
        if STEP_DIR.match(path.name) and path.name not in result.kept and path.name != resumed:
            _remove(path)

    for name, fingerprint in steps.teachers.items():
        teacher = folder / "teachers" / name
        if teacher.exists() and stored_fingerprint(teacher) != fingerprint:
            _remove(teacher)
        if not teacher.exists():
            write_text_atomic(teacher / FINGERPRINT, fingerprint + "\n")

    if result.redone or final_payload(folder, steps.final) is None:
        if not result.redone and (folder / "final.json").exists() and read_json(folder / "final.json") is None:
            logger.warning("final.json is empty or truncated: redoing the final evaluation")
        for name in ("final.json", "student", "report.md", "report.png", "hub-upload"):
            _remove(folder / name)
        result.redone.append("final")
    if steps.publish and ("final" in result.redone or marker(folder).get("published") != steps.publish):
        result.redone.append("publish")
    _log_changes(folder, recipe, result)
    write_marker(folder, marker(folder) | {"processes": world_size()})
    return result


def _log_changes(folder: Path, recipe, result: Reconciled) -> None:
    old = None
    if (folder / "recipe.yaml").is_file():
        try:
            old = yaml.safe_load((folder / "recipe.yaml").read_text())
        except (OSError, yaml.YAMLError):
            pass
    new = recipe.model_dump(mode="json")
    redo = ", ".join(f"{n} (from its last checkpoint)" if n == result.resumed else n for n in result.redone)
    redo = redo or "nothing"
    kept = ", ".join(result.kept) or "nothing"
    processes = marker(folder).get("processes", 1), world_size()
    if isinstance(old, dict) and old != new:
        changed = recipe_changes(old, new)
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        logger.info("recipe changed (%s): redoing %s; keeping %s", shown, redo, kept)
    elif processes[0] != processes[1] and result.redone != ["final"]:
        logger.info("the number of processes changed (%d -> %d; a step reads batch_size x processes rows): redoing "
                    "%s; keeping %s", *processes, redo, kept)
    elif result.kept or result.resumed:
        logger.info("resuming the run in %s: redoing %s; keeping %s", folder, redo, kept)


def start(folder: Path, recipe, steps: Plan, *, ours: bool, force: bool) -> None:
    """Rank 0, once `check_folder` passed (`ours`: the folder is an earlier run of this recipe): with `force`,
    remove the earlier run's own files; make a new run folder where needed; remove what a changed recipe
    invalidates (`reconcile`), and write the resolved recipe.yaml."""
    if ours and force:
        removed = clear(folder)
        logger.info("--force: removed the earlier run (%s) from %s", ", ".join(removed), folder)
    if not ours or force:
        logger.info("new run in %s", folder)
        create(folder, recipe.name)
    reconcile(folder, recipe, steps)
    write_text_atomic(folder / "recipe.yaml", recipe.run_yaml())
