"""Checks before a run: what a valid recipe names on disk, so that a typo fails in a second, not after hours of
training. `prod-st validate` reports these problems and `prod-st run` checks them before any work.

- Models (`student.init`, teachers' `model` / `train.backbone`, a `negatives.miner` path or id): a local folder
  (a SentenceTransformer / transformers folder, or a run folder with a finished `student/`), a packaged model, or
  a Hub id. A path-looking name that does not exist is an error; a Hub id is checked only when it is in the
  local Hub cache (else it is left to the run). `student.num_layers` is checked against the model's config.json.
- Data (`data.dataset`, `eval.beir`): the folder, its format, and the files of every split the run reads, with
  the loaders' own file-finding helpers; a BEIR name that is not downloaded yet is left to the run.
- Training (`training.precision`, `training.report_to`): fp16 needs a GPU (bf16 also runs on CPU); a logger
  (tensorboard, wandb, ...) needs its package installed.
- The index (`eval.index`, `eval.index_train_size`): a trained index (IVF, PQ) needs a training sample big
  enough for its k-means (`index_training_need`).

Nothing here loads weights or imports torch / sentence-transformers: the checks read a few small files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from prod_st.recipe import STUDENT, Recipe, data_origin, embedded_recipes
from prod_st.util.errors import ProdStError
from prod_st.util.model_paths import PACKAGED, RUN_STUDENT, is_run_folder, layer_count, looks_like_path

__all__ = ["check_recipe", "preflight"]



def preflight(recipe: Recipe, source: str) -> None:
    """Raise one :class:`ProdStError` line (`source: field: problem; ...`) if :func:`check_recipe` finds any.
    `source` is the recipe as given (a file or an embedded name): its header's `Data:` paragraph says where the
    data comes from when the dataset is not on this machine."""
    problems = check_recipe(recipe, data_from=data_origin(source))
    if problems:
        raise ProdStError(f"{source}: " + "; ".join(problems))


def check_recipe(recipe: Recipe, *, data_from: str | None = None) -> list[str]:
    """Every problem found on disk, each as `field.path: what is wrong`; empty when the recipe can run.
    `data_from`: where the recipe's data comes from (`recipe.data_origin`), added to a `data.dataset` problem
    (a folder or split file that is not here): the user learns what to download, not only what is missing."""
    problems: list[str] = []
    s = recipe.student
    problems += _model_problems("student.init", s.init, num_layers=s.num_layers)
    for name, teacher in recipe.teachers.items():
        if teacher.model is not None:
            problems += _model_problems(f"teachers.{name}.model", teacher.model)
        elif teacher.train is not None:  # (an ensemble has neither: its members are checked themselves)
            problems += _model_problems(f"teachers.{name}.train.backbone", teacher.train.backbone)
    for i, stage in enumerate(recipe.stages):
        miner = stage.negatives.miner
        if miner != STUDENT and miner not in recipe.teachers:
            problems += _model_problems(f"stages.{i}.negatives.miner", miner)

    d = recipe.data
    splits = [("data.test_split", d.test_split)]
    if d.dev_split is not None:
        splits.insert(0, ("data.dev_split", d.dev_split))
    if recipe.trains and d.train_split is not None:
        splits.insert(0, ("data.train_split", d.train_split))
    data = _data_problems("data.dataset", d.dataset, splits)
    if data and data_from:
        data[-1] += f" (where the data comes from: {data_from})"
    problems += data
    for i, name in enumerate(recipe.eval.beir):
        problems += _data_problems(f"eval.beir.{i}", name, [(f"eval.beir.{i}", "test")])
    if recipe.trains:
        problems += _training_problems(recipe.training)
    problems += _index_problems(recipe.eval.index, recipe.eval.index_train_size)
    return problems


# ------------------------------------------------------------------------------------------------ index
POINTS_PER_CENTROID = 39  # faiss's k-means warns below 39 training vectors per centroid
# the k-means parts of a faiss factory string -> centroids: IVF lists, an IMI's 2^bits per half, 2^nbits per
# (O)PQ / residual / additive quantizer codebook (8 bits unless written `PQ64x4`, as faiss reads them)
_KMEANS = (
    (re.compile(r"IVF(\d+)"), lambda m: int(m[1])),
    (re.compile(r"IMI\d+x(\d+)"), lambda m: 2 ** int(m[1])),
    (re.compile(r"(?<![A-Za-z])(?:O?PQ|RQ|LSQ|PRQ|PLSQ)\d+(?:x(\d+))?"), lambda m: 2 ** int(m[1] or 8)),
)


def index_training_need(index_factory: str) -> tuple[str, int] | None:
    """(the factory string's part with the most centroids, their number) for an index that trains k-means, else
    None (Flat, HNSW, SQ...). Parsed from the string, without faiss (validate imports no faiss)."""
    parts = [(m[0], need(m)) for pattern, need in _KMEANS for m in pattern.finditer(index_factory)]
    return max(parts, key=lambda part: part[1]) if parts else None


def _index_problems(index_factory: str, train_size: int) -> list[str]:
    """A training sample smaller than POINTS_PER_CENTROID x the centroids: faiss fails below 1 per centroid and
    warns below 39; fewer than 39 leaves centroids fitted to a handful of vectors (an index that misses what an
    exact search finds). The rule holds for the sample; a corpus smaller than it is checked when it is loaded."""
    need = index_training_need(index_factory)
    if need is None or train_size >= POINTS_PER_CENTROID * need[1]:
        return []
    part, centroids = need
    least = POINTS_PER_CENTROID * centroids
    return [f"eval.index_train_size: {train_size} vectors are too few to train {index_factory!r}: its {part} learns "
            f"{centroids} centroids and needs at least {least} ({POINTS_PER_CENTROID} per centroid, below which "
            f"faiss's k-means warns); set eval.index_train_size: {least} or use fewer centroids"]


# report_to integration -> the packages transformers needs for it (any one of them)
REPORT_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                   "comet_ml": ("comet_ml",), "clearml": ("clearml",), "neptune": ("neptune",),
                   "dvclive": ("dvclive",), "codecarbon": ("codecarbon",), "swanlab": ("swanlab",),
                   "trackio": ("trackio",)}


def _training_problems(training) -> list[str]:
    import importlib.util

    problems = []
    if training.precision == "fp16" and not gpu_visible():
        problems.append("training.precision: fp16 needs a CUDA GPU and none is visible here; use bf16 (which also "
                        "runs on CPU) or fp32")
    for name in training.report_list():
        packages = REPORT_PACKAGES.get(name, ())
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            problems.append(f"training.report_to: {name!r} needs the {packages[0]} package (pip install "
                            f"{packages[0]}), or use report_to: none")
    return problems


def gpu_visible() -> bool:
    """Whether a CUDA GPU is visible, without importing torch: torch's own answer when torch is loaded already,
    else the NVIDIA driver's files (and CUDA_VISIBLE_DEVICES not hiding every device)."""
    import os
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


# ------------------------------------------------------------------------------------------------ models
def _model_problems(where: str, name: str, *, num_layers: int | None = None) -> list[str]:
    try:
        config = _model_config(name)
    except ProdStError as e:
        return [f"{where}: {e}"]
    if num_layers is None or not isinstance(config, dict):
        return []
    total = layer_count(config)
    if total is not None and num_layers > total:
        path = where.rsplit(".", 1)[0] + ".num_layers"
        return [f"{path}: {num_layers} is more than the {total} layers of {name!r}"]
    return []


def _model_config(name: str) -> dict | None:
    """The config.json of the model `name` names (None when it cannot be read here: a Hub id that is not in the
    local cache, a model without one); a one-line error when `name` cannot be a model at all."""
    path = Path(name).expanduser()
    if path.is_dir():
        if is_run_folder(path):
            if not (path / RUN_STUDENT).is_dir():
                raise ProdStError(f"run folder {name!r} has no {RUN_STUDENT}/ yet: {_finish_hint(path)}")
            path = path / RUN_STUDENT
        return _folder_config(path, name)
    if name in PACKAGED:
        return _folder_config(Path(PACKAGED[name]()), name)
    if looks_like_path(name):
        if path.exists():
            raise ProdStError(f"{name!r} is a file, not a model folder")
        missing, hint = f"model folder {name!r} does not exist", _finish_hint(
            path.parent if path.name == RUN_STUDENT else path)  # a run's student, or the run folder itself
        raise ProdStError(f"{missing} yet: {hint}" if hint else missing)
    return _hub_config(name)


def _folder_config(folder: Path, name: str) -> dict | None:
    modules = folder / "modules.json"
    if not modules.is_file() and not (folder / "config.json").is_file():
        raise ProdStError(f"{name!r} is not a model folder (no modules.json or config.json in {folder})")
    sub = _transformer_path(_read_json(modules, name)) if modules.is_file() else ""
    config = folder / sub / "config.json"
    return _read_json(config, name) if config.is_file() else None


def _hub_config(repo_id: str) -> dict | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename)
        return Path(found) if isinstance(found, str) else None

    try:
        modules = cached("modules.json")
    except HFValidationError:
        raise ProdStError(
            f"{repo_id!r} is neither a local folder, a packaged model ({', '.join(PACKAGED)}) nor a Hugging Face Hub "
            "id"
        ) from None
    sub = _transformer_path(_read_json(modules, repo_id)) if modules is not None else ""
    config = cached(f"{sub}/config.json" if sub else "config.json")
    return _read_json(config, repo_id) if config is not None else None


def _transformer_path(modules) -> str:
    """The folder (relative) of the Transformer module of a SentenceTransformer's modules.json ('' = the root)."""
    if isinstance(modules, list):
        for module in modules:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("Transformer"):
                return str(module.get("path") or "")
    return ""


def _read_json(path: Path, name: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProdStError(f"model {name!r}: cannot read {path} ({type(e).__name__})") from None


def _finish_hint(run: Path) -> str:
    """What to do about a run folder whose student is not there yet ('' when nothing sensible can be said)."""
    embedded = embedded_recipes()
    if (run / "recipe.yaml").is_file():
        try:
            name = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("name")
        except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
            name = None
        recipe = f"recipes/{name}.yaml" if name in embedded else "its recipe"
        return f"the run in {run} has not finished: run {recipe} again to finish it"
    if run.name in embedded:
        return f"run recipes/{run.name}.yaml first (`prod-st run {run.name}` writes {run / RUN_STUDENT})"
    return ""


# ------------------------------------------------------------------------------------------------ data
def _data_problems(where: str, source: str, splits: list[tuple[str, str]]) -> list[str]:
    from prod_st.data import detect_format, local_source, split_files

    try:
        folder = local_source(source)
        if folder is None:
            return []  # a BEIR name not downloaded yet: the run downloads it
        detect_format(folder)
    except ProdStError as e:
        return [f"{where}: {e}"]
    found: dict[str, str] = {}
    for split_where, split in splits:
        try:
            split_files(folder, split)
        except ProdStError as e:
            found[split_where] = str(e)
    if len(found) > 1 and len(set(found.values())) == 1:  # a file every split needs: the folder's problem
        return [f"{where}: {next(iter(found.values()))}"]
    return [f"{split_where}: {message}" for split_where, message in found.items()]
