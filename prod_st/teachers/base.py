"""The one teacher interface every stage uses, and the row checks the teachers share."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from prod_st.util.errors import ProdStError
from prod_st.util.paths import cache_dir

TeacherKind = Literal["bi-encoder", "cross-encoder", "ensemble"]
Precision = Literal["fp32", "bf16", "fp16"]


@runtime_checkable
class Teacher(Protocol):
    """A scorer of candidate lists: `score(queries, candidate_lists)[i][j]` is the teacher's (raw, unnormalised)
    score of `candidate_lists[i][j]` for `queries[i]`; higher = more relevant."""

    name: str
    kind: TeacherKind

    def score(
        self, queries: list[str], candidate_lists: list[list[str]], *, progress: bool = True
    ) -> list[list[float]]: ...


def check_rows(queries: list[str], candidate_lists: list[list[str]]) -> None:
    """One-line error unless there is one candidate list per query."""
    if len(queries) != len(candidate_lists):
        raise ProdStError(f"{len(queries)} queries but {len(candidate_lists)} candidate lists; need one list per query")


def teacher_cache_root(cache_root: str | Path | None) -> Path:
    """`cache_root` (created) or the default `<PROD_ST_CACHE>/teachers`."""
    if cache_root is None:
        return cache_dir("teachers")
    path = Path(cache_root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def precision_context(precision: Precision, device: torch.device | str):
    """torch.autocast for a teacher's forward passes in `precision` (fp32: no autocast). fp16 needs a GPU."""
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type == "cpu":
        raise ProdStError("training.precision: fp16 teacher scoring needs a GPU (the teacher is on the CPU); use "
                          "bf16 or fp32")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cache_folder(cache_root: str | Path | None, fingerprint: str, precision: Precision) -> Path:
    """`<cache_root>/<fingerprint>` for fp32 (the caches written before precision existed stay valid), else
    `<cache_root>/<fingerprint>-<precision>`: scores computed in another precision are never mixed."""
    return teacher_cache_root(cache_root) / (fingerprint if precision == "fp32" else f"{fingerprint}-{precision}")


def model_name(model: object, given: str | Path | None) -> str:
    """A readable teacher name: the path/name it was loaded from, else its class."""
    return str(given) if given is not None else type(model).__name__


def scores_to_labels(scores: list[list[float]], width: int | None = None) -> torch.Tensor:
    """Teacher scores as PRODLoss list-mode `labels`: a (B, width) float32 tensor, each row's scores first
    (positive first, as scored) and `-inf` for missing candidates; `width` defaults to the longest row."""
    width = max((len(row) for row in scores), default=0) if width is None else width
    labels = torch.full((len(scores), width), float("-inf"), dtype=torch.float32)
    for i, row in enumerate(scores):
        if len(row) > width:
            raise ProdStError(f"row {i} has {len(row)} scores, more than the {width} candidate columns")
        labels[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return labels
