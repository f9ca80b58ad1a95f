"""What a step leaves in its folder: the metrics.json record (`StageRecord`, read by the report, the card and a
resumed run), and JSON written once by rank 0 for every rank."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prod_st.util.distributed import barrier, is_main
from prod_st.util.paths import write_text_atomic


@dataclass
class StageRecord:
    """What a finished stage leaves in its metrics.json (and what the report reads)."""

    index: int
    name: str
    kind: str
    teacher: str | None = None
    student_dev: dict = field(default_factory=dict)
    teacher_dev: dict = field(default_factory=dict)
    teacher_measured_as: str | None = None
    teacher_rerank_dev: dict = field(default_factory=dict)  # the teacher reranking the student's dev top-k
    gap_before: dict = field(default_factory=dict)
    gap_after: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> StageRecord:
        return cls(**json.loads((folder / "metrics.json").read_text()))


def atomic_json(path: Path, payload) -> None:
    """Write JSON to a temp file and rename it into place: a killed process never leaves half a file."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=float) + "\n")


def write_json(path: Path, payload) -> None:
    """Rank 0 writes `path`; every rank calls this and returns once the file is there (a barrier), so any
    rank may read it next."""
    if is_main():
        atomic_json(path, payload)
    barrier()


def fmt(metrics: dict) -> str:
    """Metrics as one log phrase: `ndcg@10 0.5012, mrr@10 ...` in the report's column order."""
    from prod_st.run.report import metric_columns

    return ", ".join(f"{k} {metrics[k]:.4f}" for k in metric_columns([metrics]) if k in metrics)
