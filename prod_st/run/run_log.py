"""`<run>/run.log`: every log line of a run, appended across resumes.

`RunLog` is a logging handler on the root logger for the length of `Runner.run`: it holds the records logged
before the run folder is ready (which folder, what a changed recipe redoes), then appends them and every later
record to `<run>/run.log`. Only rank 0 opens the file (other ranks' records are dropped here; their warnings
still reach the console).
"""

from __future__ import annotations

import logging
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NAME = "run.log"


class RunLog(logging.Handler):
    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        self.pending: list[logging.LogRecord] = []
        self.file = None

    @classmethod
    def attach(cls) -> RunLog:
        """A new handler on the root logger, at the level the root logs at (INFO at least)."""
        handler = cls(min(logging.getLogger().getEffectiveLevel(), logging.INFO))
        logging.getLogger().addHandler(handler)
        return handler

    def open(self, folder: Path) -> None:
        """Append to `<folder>/run.log` from now on, starting with the records held so far."""
        self.file = open(Path(folder) / NAME, "a", encoding="utf-8")
        pending, self.pending = self.pending, []
        for record in pending:
            self.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            self.pending.append(record)
            return
        try:
            self.file.write(self.format(record) + "\n")
            self.file.flush()
        except Exception:  # noqa: BLE001 (logging must never break the run)
            self.handleError(record)

    def close(self) -> None:
        logging.getLogger().removeHandler(self)
        if self.file is not None:
            self.file.close()
            self.file = None
        self.pending = []
        super().close()
