"""Publish a finished run's student on the Hugging Face Hub.

``build_upload_folder`` writes what would be uploaded: the final student (``<run>/student/``) with the model card
the run wrote for it (``README.md``, see ``prod_st.run.model_card``: sentence-transformers' card as the trainer filled
it, plus the PROD section), the repository id put in; and under ``prod/`` the run's recipe.yaml,
report.md/report.png and final.json. ``push_run`` builds that folder in a temporary directory (or, for a dry run,
in ``<run>/hub-upload/``) and uploads it with ``HfApi.create_repo`` + ``HfApi.upload_folder``.

Nothing here writes into the run's own files, and every failure is a one-line :class:`ProdStError` that says
what to do (prod_st.util.hub maps huggingface_hub's errors). Only rank 0 pushes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from prod_st.util import locks
from prod_st.util.errors import ProdStError
from prod_st.util.hub import HUB, check_repo_id, hub_api, upload_folder
from prod_st.util.paths import write_folder_atomic

logger = logging.getLogger(__name__)

__all__ = ["build_upload_folder", "push_run", "validate_repo_id"]

UPLOAD_DIR = "hub-upload"  # the dry run's default folder, inside the run folder
validate_repo_id = check_repo_id


def _is_main() -> bool:
    from prod_st.util.distributed import is_main

    return is_main()


# ----------------------------------------------------------------------------------------------- checks
def _finished_run(run_dir: Path | str) -> Path:
    from prod_st.run.report import read_run
    from prod_st.util.models import saved_layer_count

    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ProdStError(f"run folder not found: {run}")
    if not (run / "final.json").is_file():
        raise ProdStError(f"{run} is not a finished run (no final.json): finish it with `prod-st run` first")
    if not (run / "student" / "modules.json").is_file():
        raise ProdStError(f"{run} has no final student ({run / 'student'} is missing): finish the run with "
                          "`prod-st run` first")
    # The card describes the student as the recipe's first `student.num_layers` layers: refuse a saved student
    # whose own config says otherwise rather than publish a card that contradicts the model.
    expected = (read_run(run)[0].get("student") or {}).get("num_layers")
    found = saved_layer_count(run / "student")
    if expected is not None and found is not None and found != expected:
        raise ProdStError(f"{run / 'student'} has {found} transformer layers but the run's recipe says "
                          f"student.num_layers: {expected}: its model card would contradict the model; publish the "
                          "student that run made")
    return run


def _is_upload_folder(folder: Path) -> bool:
    """A folder this module wrote earlier (safe to replace)."""
    return folder.is_dir() and (folder / "prod" / "recipe.yaml").is_file() and (folder / "modules.json").is_file()


def _check_out_dir(run: Path, out: Path) -> None:
    """Refuse an output folder that would overwrite the run (or anything that is not an earlier upload folder)."""
    r, o = run.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise ProdStError(f"the upload folder {out} would overwrite the run folder {run}: choose another folder")
    if r in o.parents:
        top = r / o.relative_to(r).parts[0]
        if top.exists() and not _is_upload_folder(top):
            raise ProdStError(f"the upload folder {out} lies inside the run's own files ({top.name}): choose "
                              f"another folder, e.g. {run / UPLOAD_DIR}")
    if o.exists():
        if not o.is_dir():
            raise ProdStError(f"the upload folder {out} exists and is not a folder: choose another folder")
        if any(o.iterdir()) and not _is_upload_folder(o):
            raise ProdStError(f"the upload folder {out} exists and is not empty (and not an earlier upload folder): "
                              "choose a new or empty folder")


# ----------------------------------------------------------------------------------------------- the folder
def _fill(run: Path, out: Path, repo_id: str) -> None:
    from prod_st.run.model_card import set_model_id, write_card
    from prod_st.run.report import load_records, plot, read_run, render_markdown, run_metric

    shutil.copytree(run / "student", out, dirs_exist_ok=True)
    if not set_model_id(out / "README.md", repo_id):  # a run from before prod-st wrote its card: write it now
        write_card(run, out, model_id=repo_id)
    prod = out / "prod"
    prod.mkdir(exist_ok=True)
    for name in ("recipe.yaml", "final.json", "report.md", "report.png"):
        if (run / name).is_file():
            shutil.copy2(run / name, prod / name)
    if not (run / "report.md").is_file():  # render it here, never in the run folder
        records, drawn = load_records(run), False
        try:
            drawn = bool(records) and plot(records, prod / "report.png", run_metric(run))
        except Exception as e:  # noqa: BLE001 - a missing plot should not stop the publication
            logger.warning("could not draw report.png: %s", e)
        text = render_markdown(run, records, read_run(run)[1], run_metric(run), plot=drawn)
        (prod / "report.md").write_text(text, encoding="utf-8")


def build_upload_folder(run_dir: Path | str, out_dir: Path | str, *, repo_id: str) -> Path:
    """Write the Hub upload folder of a finished run into `out_dir` (replacing an earlier upload folder there)
    and return its path. The run folder itself is only read."""
    repo_id = check_repo_id(repo_id)
    run = _finished_run(run_dir)
    out = Path(out_dir).expanduser()
    _check_out_dir(run, out)
    write_folder_atomic(out, lambda tmp: _fill(run, tmp, repo_id), replace=True)
    logger.info("upload folder for %s written to %s", repo_id, out)
    return out


# ----------------------------------------------------------------------------------------------- the push
def push_run(
    run_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    dry_run_dir: Path | str | None = None,
    exist_ok: bool = False,
    token: str | None = None,
    api=None,
    commit_message: str | None = None,
) -> Path | str:
    """Publish a finished run's student as the Hub model `repo_id` and return its URL; with `dry_run`, only write
    the upload folder (default `<run>/hub-upload/`) and return its path, without any network call.

    Any failure is a one-line ProdStError and the run's files are never changed. Only rank 0 pushes; other
    ranks return at once."""
    repo_id = check_repo_id(repo_id)
    run = _finished_run(run_dir)
    if dry_run:
        out = Path(dry_run_dir).expanduser() if dry_run_dir is not None else run / UPLOAD_DIR
        if not _is_main():
            return out
        with locks.holding_run_folder(run, "push"):  # no run rewrites the student while it is read
            return build_upload_folder(run, out, repo_id=repo_id)
    if not _is_main():
        return f"{HUB}/{repo_id}"
    message = commit_message or f"Upload the PROD student of run {run.name} (prod-st)"
    api = api if api is not None else hub_api(token)  # (no token: refused before the folder is built)
    with tempfile.TemporaryDirectory(prefix="prod-st-upload-") as tmp, locks.holding_run_folder(run, "push"):
        folder = build_upload_folder(run, Path(tmp) / "upload", repo_id=repo_id)
        url = upload_folder(folder, repo_id, api=api, repo_type="model", private=private, exist_ok=exist_ok,
                            message=message)
    logger.info("pushed %s to %s", run, url)
    return url


def publish_run(run_dir: Path, spec, fingerprint: str) -> None:
    """A run's `publish:` block (`spec`, or None): push the finished run unless it was already published under
    the same `fingerprint`, then note it in the run's marker. Every rank calls this."""
    from prod_st.run import run_folder
    from prod_st.util.distributed import barrier, is_main

    if spec is None or run_folder.marker(run_dir).get("published") == fingerprint:
        return
    where = push_run(run_dir, spec.repo_id, private=spec.private, exist_ok=spec.exist_ok, dry_run=spec.dry_run)
    if is_main():
        run_folder.write_marker(run_dir, run_folder.marker(run_dir) | {"published": fingerprint})
    barrier()
    logger.info("published: %s", where)
