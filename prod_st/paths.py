"""Where prod-st keeps what it can rebuild: Arrow copies of datasets, downloads, teacher caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$PROD_ST_CACHE` (default `~/.cache/prod-st`), joined with `parts` and created."""
    root = Path(os.environ.get("PROD_ST_CACHE") or Path.home() / ".cache" / "prod-st")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
