"""Where prod-st keeps what it can rebuild (Arrow copies of datasets, downloads, teacher caches), and the checks
and atomic writes of the files and folders a command produces: an output that cannot be written is refused
before the work, and a write is never left half done."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prod_st.util.errors import DiskFullError, ProdStError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)
_temp_names = itertools.count()  # atomic_path's temp names: unique within a process

FULL = (errno.ENOSPC, errno.EDQUOT)
# how libraries that do not raise an OSError word a full disk (safetensors: "No space left on device (os error 28)")
FULL_SIGNS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_writes_to: dict[str, Path] = {}  # what this command writes into, by description (the run folder)


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


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """prod-st's one atomic write: a temporary name next to `path` for the caller to write (`.NAME.tmpPID-N`, see
    `run_folder.TEMP`; `suffix` ends it, e.g. `.npy`, which np.save would otherwise add), renamed onto `path` when
    the block ends without an error and removed otherwise: a failed or killed write never leaves half a file (nor
    replaces a good one). An OSError (a full disk: `DiskFullError`) is one line naming `path`."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{next(_temp_names)}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_folder_atomic(path: Path | str, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Let `write(tmp)` fill a temporary folder next to `path`, then rename it to `path` (absent or an empty
    folder, see `check_output_folder`; with `replace`, a folder prod-st made, removed only once the new one is
    complete): a failed write leaves no half-written folder behind."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise ProdStError(f"cannot create {path}: {e.strerror or e}") from None
    try:
        write(tmp)
        if replace and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)  # onto an absent path or an empty folder only: never over someone's files
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ---- damaged cache entries -----------------------------------------------------------------------------------
def discard_damaged(path: Path, error: BaseException) -> None:
    """A cache file (or folder) prod-st wrote that can no longer be read (a disk error, a copy killed midway, garbage): say
    so in one line and remove it; what it held is computed again."""
    why = " ".join(str(error).split())[:200] or type(error).__name__
    logger.warning("damaged cache entry %s (%s): removed, it will be computed again", path, why)
    if Path(path).is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def load_cached_array(path: Path, rows: int | None = None) -> np.ndarray | None:
    """The .npy cache file `path` memory-mapped, or None when it is missing or damaged (then removed, see
    `discard_damaged`): not an array file, truncated, or not `rows` rows long."""
    import numpy as np  # (here: `prod-st validate` imports this module and stays light)

    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:  # bad header, or a file shorter than its header says
        discard_damaged(path, e)
        return None
    if rows is not None and (array.ndim == 0 or len(array) != rows):
        discard_damaged(path, ValueError(f"{len(array) if array.ndim else 0} rows, expected {rows}"))
        return None
    return array


# ---- a full disk ---------------------------------------------------------------------------------------------
def cannot_write(path: Path, error: OSError) -> ProdStError:
    """The one-line error for a failed write of `path`: a full disk's own (exit 4), or `cannot write` (exit 2)."""
    return disk_full_error(error, path) or ProdStError(f"cannot write {path}: {error.strerror or error}")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in the error when a full disk stops the block (a model save, a trainer's checkpoints)."""
    try:
        yield
    except Exception as e:
        if (full := disk_full_error(e, path)) is None:
            raise
        raise full from None


def writes_to(what: str, path: Path) -> None:
    """Record that this command writes into `path` (e.g. "the run folder"): a full disk names the fuller of it
    and the cache when the failed write did not say which file it was."""
    _writes_to[what] = Path(path)


def disk_full_error(error: BaseException, path: Path | str | None = None) -> DiskFullError | None:
    """A DiskFullError when `error` (or an exception it was raised from) says a disk is full, else None. It names
    the file being written (`path`, or the one the error names) and the space left on its file system; when
    neither is known, the fullest of the folders this command writes into (`writes_to`, the cache)."""
    seen, e, full = set(), error, False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL or any(sign in str(e) for sign in FULL_SIGNS):
            full = True
            path = path or getattr(e, "filename", None)
        e = e.__cause__ or e.__context__
    if not full:
        return None
    if path:
        target, free = f"{path}", _free(Path(path))
    else:
        places = [(_free(p), f"{what} {p}") for what, p in (*_writes_to.items(), ("the prod-st cache", cache_path()))]
        free, target = min(places, key=lambda place: place[0] if place[0] is not None else float("inf"))
        target = f"into {target}"
    space = f" ({_mb(free)} free on its file system)" if free is not None else ""
    return DiskFullError(f"no space left on the device writing {target}{space}: free some space (or give --output or "
                         "PROD_ST_CACHE on a bigger disk) and run the same command again; it resumes from the last "
                         "finished step")


def _free(path: Path) -> int | None:
    """Free bytes on the file system of `path` (its first existing ancestor)."""
    path = Path(path).expanduser()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mb(size: int) -> str:
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.1f} MB"
