"""Where prod-st keeps what it can rebuild (Arrow copies of datasets, downloads, teacher caches), and the checks
and atomic writes of the files and folders a command produces: an output that cannot be written is refused
before the work, and a write is never left half done."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from prod_st.errors import ProdStError


def cache_path(*parts: str) -> Path:
    """`$PROD_ST_CACHE` (default `~/.cache/prod-st`), joined with `parts`; nothing is created (for checks)."""
    return Path(os.environ.get("PROD_ST_CACHE") or Path.home() / ".cache" / "prod-st").expanduser().joinpath(*parts)


def cache_dir(*parts: str) -> Path:
    """`$PROD_ST_CACHE` (default `~/.cache/prod-st`), joined with `parts`, created and writable."""
    path = cache_path(*parts)
    try:
        _check_creatable(path, "the prod-st cache folder")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProdStError(f"cannot create the prod-st cache folder {path} ({e.strerror or e}): "
                          "set PROD_ST_CACHE to a writable folder") from None
    except ProdStError as e:
        raise ProdStError(f"{e}: set PROD_ST_CACHE to a writable folder") from None
    return path


def _check_creatable(folder: Path, what: str, target: Path | None = None) -> None:
    """`folder` exists as a writable folder, or can be created: its first existing ancestor is a writable folder.
    The message names `target` (default `folder`), the file or folder that is to be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ProdStError(f"cannot write {what} {target or folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ProdStError(f"cannot write {what} {target or folder}: {existing} is not writable")


def check_output_file(path: Path | str, what: str = "output file") -> Path:
    """Refuse, before any work, a file path prod-st could not write: a folder, or a file whose folder cannot be
    created or written. Returns the path (user home expanded)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ProdStError(f"{what} {path} is a folder: give the path of a file")
    _check_creatable(path.parent, what, path)
    return path


def check_output_folder(path: Path | str, what: str = "output folder") -> Path:
    """Refuse, before any work, a folder prod-st may not write: an existing file, a non-empty folder (prod-st
    never overwrites what it did not create), or one that cannot be created. Returns the path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ProdStError(f"{what} {path} exists and is a file: give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise ProdStError(f"{what} {path} exists and is not empty: give a new or empty folder "
                          "(prod-st does not overwrite folders it did not create)")
    _check_creatable(path, what)
    return path


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write `text` to a temporary file next to `path` and rename it into place: a failed or killed write never
    leaves half a file (nor replaces a good one)."""
    path = Path(path).expanduser()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)  # .NAME.tmp*: see run_folder.TEMP
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ProdStError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_folder_atomic(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary folder next to `path`, then rename it to `path` (absent or an empty
    folder, see `check_output_folder`): a failed write leaves no half-written folder behind."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise ProdStError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        write(tmp)
        os.replace(tmp, path)  # onto an absent path or an empty folder only: never over someone's files
    except OSError as e:
        raise ProdStError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
