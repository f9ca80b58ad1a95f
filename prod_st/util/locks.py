"""Advisory file locks (`flock`) for a machine that several runs share.

- **A run folder has one run at a time.** `lock_run_folder` holds an exclusive lock on `<run>/.prod-st-lock`
  for the run's life; a second run into the same folder is refused in one line naming the first (pid, host,
  start time). The kernel drops a flock when its process ends, however it ends, so a run killed with
  `kill -9` leaves no stale lock to clean up: the file stays, unlocked.
- **A cache entry in use is never removed.** Every process that reads a cache entry that prod-st may later
  delete (a checkpoint's corpus encoding, a stage-start student's embeddings) holds a shared lock on the
  entry's `.in-use` file (`use`); `remove_unless_used` deletes the entry only when it gets the exclusive lock,
  i.e. when no other run is reading it, and keeps it otherwise.
- **One trainer per teacher.** `exclusive` serialises two runs that would train the same teacher into the
  same cache entry: the second waits, then finds it trained.

Locks are per process: under torchrun each rank takes its own shared locks; the run folder's is rank 0's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prod_st.util.errors import ProdStError

logger = logging.getLogger(__name__)

RUN_LOCK = ".prod-st-lock"  # in a run folder
IN_USE = ".in-use"  # in a cache entry folder
_held: dict[Path, int] = {}  # cache entry folder -> the fd of this process's shared lock on it
_run_locks: dict[Path, RunLock] = {}  # lock file -> this process's hold on that run folder


# ---- the run folder ------------------------------------------------------------------------------------------
@dataclass
class RunLock:
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the file drops the lock; the file stays (removing it would race)
            self.fd = -1


def lock_run_folder(folder: Path, what: str = "run") -> RunLock:
    """Hold the run folder `folder` (it exists) for this process until `release()` or its end; one line and exit
    2 when another process holds it."""
    path = folder / RUN_LOCK
    held = _run_locks.get(path.resolve())
    if held is not None and held.fd >= 0:
        return held  # this process holds it already (runs one after another in one process): never a conflict
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        hint = f", or give this {what} another --output" if what == "run" else f" before this {what}"
        raise ProdStError(f"the run folder {folder} is in use by another prod-st command ({holder}): wait for it to "
                          f"end{hint}") from None
    stamp = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
             "command": what}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(stamp) + "\n").encode(), 0)
    _run_locks[path.resolve()] = lock = RunLock(path, fd)
    return lock


@contextlib.contextmanager
def holding_run_folder(folder: Path, what: str) -> Iterator[None]:
    """The run folder `folder` held for a block by a command that reads a finished run (`push`): refused in one
    line while a run writes into it, and a run started meanwhile is refused. Released after the block unless
    this process held it before (a run publishing itself). Unlocked where no run ever held the folder (no lock
    file: a copied run folder, which this does not write into) or where the lock file cannot be opened for
    writing (a read-only folder)."""
    path = folder / RUN_LOCK
    already = _run_locks.get(path.resolve())
    if (already is not None and already.fd >= 0) or not path.is_file():
        yield
        return
    try:
        lock = lock_run_folder(folder, what)
    except OSError:  # a read-only folder or file system (the refusal of a busy folder is a ProdStError)
        logger.debug("%s: no lock file (read-only folder); going on unlocked", folder)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        stamp = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"{stamp.get('command', 'run')}: pid {stamp['pid']} on {stamp['host']}, started "
                f"{stamp['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


# ---- cache entries -------------------------------------------------------------------------------------------
def use(folder: Path) -> None:
    """Hold a shared lock on the cache entry `folder` (created if missing) until this process releases it or
    ends: no other run removes the entry meanwhile. Waits only while another process is removing it (then the
    entry is made anew)."""
    folder = Path(folder)
    if folder in _held:
        return
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / IN_USE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False  # removed while we waited: start again on a new entry
        if same:
            _held[folder] = fd
            return
        os.close(fd)


def drop(folder: Path) -> None:
    """Stop holding `folder` (this process no longer reads it)."""
    fd = _held.pop(Path(folder), None)
    if fd is not None:
        os.close(fd)


def remove_unless_used(folder: Path, remove: Callable[[Path], None]) -> bool:
    """`remove(folder)` (which deletes the entry, its IN_USE file included) unless another process holds the
    entry; this process's own hold ends either way. Returns whether it was removed."""
    folder = Path(folder)
    fd = _held.pop(folder, None)
    if fd is None:
        if not folder.is_dir():
            return False
        fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (converting our shared lock, if we held one)
        except BlockingIOError:
            logger.info("kept %s: another run is reading it", folder)
            return False
        remove(folder)
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path, waiting: str) -> Iterator[None]:
    """An exclusive lock on the file `path` for the block; logs `waiting` once if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
