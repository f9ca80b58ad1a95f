"""What a long step will cost, in the log before it starts: how many items, an estimate of the memory it adds,
and (for work done batch by batch) an estimate of its time once the first batch is done. Estimates count the
big arrays a step holds (a faiss index, a batch of labels, a model with its optimizer state), not Python's
own overhead. After the step, `step` logs how long it took."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

logger = logging.getLogger("prod_st.run")
T = TypeVar("T")
FLOAT32 = 4
RUN_ENTRY = 64  # bytes of one (query, doc id) entry of a ranked run held as Python lists of id strings


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def human_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f}s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def index_bytes(docs: int, dim: int, bytes_per_value: int = FLOAT32) -> int:
    """A flat faiss index (or the embedding matrix it is built from) of `docs` vectors."""
    return docs * dim * bytes_per_value


def label_bytes(rows: int, values_per_row: int) -> int:
    """One batch of float32 labels."""
    return rows * values_per_row * FLOAT32


def run_bytes(queries: int, depth: int) -> int:
    """A ranked run: `depth` doc ids per query."""
    return queries * depth * RUN_ENTRY


def model_bytes(model) -> int:
    """A model's fp32 weights."""
    return FLOAT32 * sum(p.numel() for p in model.parameters())


def training_bytes(model) -> int:
    """A model being trained with AdamW in fp32: weights, gradients and two moments."""
    return 4 * model_bytes(model)


def announce(what: str, items: int, unit: str, memory: float) -> None:
    """One log line before a long step: `what: N unit, est. memory M`."""
    logger.info("%s: %s %s, est. memory %s", what, f"{items:,}", unit, human_bytes(memory))


def search_cost(what: str, model, docs: int, queries: int, depth: int) -> None:
    """Announce a corpus encoding + exact search: the index of `docs` vectors and a run of `depth` per query."""
    announce(what, docs + queries, f"texts ({docs:,} documents + {queries:,} queries)",
             index_bytes(docs, model.get_embedding_dimension() or 0) + run_bytes(queries, depth))


def timed(what: str, batches: Iterable[T], total: int, batch: int) -> Iterator[T]:
    """Yield `batches` (of `batch` items each, `total` in all) and, after the first when more follow, log the
    estimated time of the whole step from it."""
    start = time.perf_counter()
    for i, item in enumerate(batches):
        if i == 0 and total > batch:
            took = time.perf_counter() - start
            logger.info("%s: first %s of %s in %s, est. %s in all", what, f"{batch:,}", f"{total:,}",
                        human_seconds(took), human_seconds(took * total / batch))
        yield item


@contextmanager
def step(what: str, seconds: dict, key: str) -> Iterator[None]:
    """Log one line per step with its duration, and record the duration under `seconds[key]`. Called as
    `cost.step(...)` (bench/scale.py wraps it to attribute CPU time and memory to each step)."""
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 1)
    logger.info("%s: done in %.1fs", what, seconds[key])
