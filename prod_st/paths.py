"""Where prod-st keeps what it can rebuild: Arrow copies of datasets, downloads, teacher caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_path(*parts: str) -> Path:
    """`$PROD_ST_CACHE` (default `~/.cache/prod-st`), joined with `parts`; nothing is created (for checks)."""
    return Path(os.environ.get("PROD_ST_CACHE") or Path.home() / ".cache" / "prod-st").joinpath(*parts)


def cache_dir(*parts: str) -> Path:
    """`$PROD_ST_CACHE` (default `~/.cache/prod-st`), joined with `parts` and created."""
    path = cache_path(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
